"""The MoE router load-balancing loss of a SoLoPO step, added as TRL's DPOTrainer adds it.

TRL 1.16 (and 1.14.1) adds ``router_aux_loss_coef * aux_loss`` to the DPO loss for a config that
has ``output_router_logits`` (Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE, ...), where ``aux_loss`` is the
Switch Transformer load-balancing loss of its one policy forward (transformers'
``load_balancing_loss_func``, which every MoE family takes from Mixtral), over the tokens of that
forward's attention mask, and logs it as ``aux_loss``. The coefficient is
``args.router_aux_loss_coef``, or the config's own when that is None (0.0 when it has none).

A SoLoPO step runs the policy more than once (padded: the short pair batch and the long batch;
packed with ``max_packed_length``: one forward per packed row), so the loss here is the one of all
the step's policy tokens pooled, which is what one forward over all its rows gives::

    aux = E * sum_e (c_e / n) * (p_e / n)

with ``c_e`` the top-k assignments to expert ``e``, ``p_e`` the sum of its routing probabilities
(softmax of the router logits) and ``n`` the number of routed rows, each summed over every layer
and every non-padding token of every policy forward of the step. Every token counts once: short
and long rows are weighted by their token counts (the long rows, being longer, dominate), and a
padded step gives the value of the same step packed. The reference forwards contribute nothing
(as in TRL). Each forward keeps only the three sums (:class:`RouterLoad`), not its router logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RouterLoad:
    """The sums of the load-balancing loss over the routed rows of one or more forwards.

    Attributes:
        assignments: ``(E,)`` float32, top-k assignments per expert (no gradient).
        probabilities: ``(E,)`` float32, routing probabilities summed per expert (differentiable
            in the router logits).
        rows: ``()`` float32, the number of routed (layer, token) rows.
    """

    assignments: torch.Tensor
    probabilities: torch.Tensor
    rows: torch.Tensor

    def __add__(self, other: RouterLoad) -> RouterLoad:
        return RouterLoad(
            self.assignments + other.assignments,
            self.probabilities + other.probabilities,
            self.rows + other.rows,
        )

    def loss(self) -> torch.Tensor:
        """The Switch Transformer load-balancing loss ``E * sum_e (c_e / n) (p_e / n)``."""
        n = self.rows.clamp(min=1)
        return self.assignments.shape[0] * torch.sum(
            (self.assignments / n) * (self.probabilities / n)
        )


def moe_sizes(config: Any) -> tuple[int, int] | None:
    """``(num_experts, num_experts_per_tok)`` of an MoE config (its text config), or None for a
    config without ``output_router_logits``."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not hasattr(text_config, "output_router_logits"):
        return None
    experts = getattr(text_config, "num_experts", None) or getattr(
        text_config, "num_local_experts", None
    )
    top_k = getattr(text_config, "num_experts_per_tok", None)
    if not experts or not top_k:
        raise ValueError(
            f"{type(config).__name__}: an MoE config (output_router_logits) without num_experts "
            "and num_experts_per_tok; the router load-balancing loss cannot be computed"
        )
    return int(experts), int(top_k)


def router_load(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    token_mask: torch.Tensor | None,
) -> RouterLoad:
    """The sums of one forward: ``router_logits`` holds one ``(B * T, E)`` tensor per MoE layer
    (the backbone's output with ``output_router_logits=True``); ``token_mask (B, T)`` marks the
    tokens that count (None: all). Layer by layer, as transformers computes it: only ``(E,)``
    sums are kept."""
    device = router_logits[0].device
    assignments = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probabilities = torch.zeros(num_experts, dtype=torch.float32, device=device)
    mask = None if token_mask is None else token_mask.reshape(-1).to(device, torch.float32)
    rows = 0.0
    for layer_logits in router_logits:
        # As transformers' load_balancing_loss_func: the softmax in the logits' dtype, top-k on
        # it, the sums in float32.
        weights = torch.softmax(layer_logits.to(device), dim=-1)
        selected = torch.topk(weights, top_k, dim=-1).indices
        weights = weights.float()
        counted = (
            torch.ones_like(selected, dtype=torch.float32)
            if mask is None
            else mask[:, None].expand_as(selected)
        )
        assignments = assignments.scatter_add(0, selected.reshape(-1), counted.reshape(-1))
        weighted = weights if mask is None else weights * mask[:, None]
        probabilities = probabilities + weighted.sum(0)
        rows = rows + (weights.shape[0] if mask is None else mask.sum())
    rows = torch.as_tensor(rows, dtype=torch.float32, device=device)
    return RouterLoad(assignments, probabilities, rows)


def aux_loss_coefficient(config: Any, args: Any) -> float:
    """The weight of the load-balancing loss in the step's loss, by DPOTrainer's rule: 0.0 (off)
    for a config without ``output_router_logits``; else ``args.router_aux_loss_coef``, or the
    config's ``router_aux_loss_coef`` when that is None. A coefficient set for a model that is not
    MoE raises ``ValueError`` (TRL's check)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    coefficient = getattr(args, "router_aux_loss_coef", None)
    is_moe = hasattr(text_config, "output_router_logits")
    if coefficient and not is_moe:
        raise ValueError(
            f"router_aux_loss_coef: set to {coefficient} but {type(config).__name__} is not a "
            "Mixture-of-Experts model that returns its router logits, so there is no auxiliary "
            "loss to weight"
        )
    if not is_moe:
        return 0.0
    if coefficient is None:
        coefficient = getattr(text_config, "router_aux_loss_coef", 0.0) or 0.0
    return float(coefficient)
