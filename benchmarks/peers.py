"""The loss-head implementations compared by the benchmarks, as small adapters on one workload.

A *workload* fixes the shapes of one benchmark cell; :func:`make_inputs` builds its tensors (the
last hidden states, the lm_head weight, shifted labels and constant reference log-prob sums), and
each *peer* turns them into a ``step()`` that runs forward + backward of its loss head once.

Workload kinds:

* ``solopo``: one SoLoPO batch: the short pair ``x_short + y_w``, ``x_short + y_l`` (``2B`` rows
  of ``Ts + R`` positions: context, then response) and the long chosen row ``x_long + y_w``
  (``B`` rows of ``Tl + R``), the full SoLoPO loss (preference loss on
  the short pair + ``alpha`` x SoLo-RA between the short and long rewards of ``y_w``);
* ``dpo-long``: long-context DPO, the baseline SoLoPO replaces: the pair ``x_long + y_w``,
  ``x_long + y_l`` (``2B`` rows of ``Tl + R``), the DPO (or SimPO/ORPO/CPO) loss;
* ``logprobs``: one sequence of ``T`` positions with ``N`` response tokens, the sum of per-token
  log-probs (the primitive every loss above is built from).

Every peer reads the same tensors and computes the same quantity where its API can express it;
:attr:`Peer.computes` says what it computes for a workload (the table prints it). Reference
log-prob sums are precomputed constants for every peer (a trainer computes them once per dataset,
or in a no-grad pass that is not part of the loss head). The per-sequence objective of the peers
that return per-token log-probs is ``solopo_kernels.solopo_loss`` (a few scalar ops): the head is
what differs, so it is the only thing that should.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from harness import Cell, Unavailable

IGNORE_INDEX = -100
KINDS = ("solopo", "dpo-long", "logprobs")
LOSS_TYPES = ("dpo", "simpo", "orpo", "cpo")
# The paper's alpha: 3 for SoLo-DPO, 1 for SoLo-SimPO/ORPO (the paper, with Qwen2.5-7B); beta/gamma: TRL's defaults.
LOSS_OPTIONS: dict[str, dict[str, float]] = {
    "dpo": {"beta": 0.1, "alpha": 3.0},
    "simpo": {"beta": 2.0, "gamma": 0.5, "alpha": 1.0},
    "orpo": {"beta": 0.1, "alpha": 1.0},
    "cpo": {"beta": 0.1, "alpha": 1.0},
}

Inputs = dict[str, torch.Tensor]
Step = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Workload:
    """The shapes of one cell.

    Attributes:
        kind: one of :data:`KINDS`.
        long_len: ``Tl``, the long context ``x_long`` of each long row (``T``, all positions of
            the sequence, for ``logprobs``).
        short_len: ``Ts``, the short context ``x_short`` of each short row (``solopo`` only).
        response_len: response tokens per row, after the context (``N``, within ``T``, for
            ``logprobs``); the responses sit at the
            end of each row (prompt positions carry ``ignore_index``).
        hidden: ``H``; vocab: ``V``.
        pairs: ``B``, preference pairs per batch.
        loss_type: ``dpo``, ``simpo``, ``orpo`` or ``cpo``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
    """

    kind: str
    long_len: int
    short_len: int
    response_len: int
    hidden: int
    vocab: int
    pairs: int = 1
    loss_type: str = "dpo"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.response_len <= 0 or (
            self.kind == "logprobs" and self.response_len > self.long_len
        ):
            raise ValueError(
                f"response_len: expected 0 < N (<= T = {self.long_len} for logprobs), got {self.response_len}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def rows(self) -> list[int]:
        """Positions of every row the loss head reads (what a head without compaction pays for)."""
        if self.kind == "solopo":
            short, long = self.short_len + self.response_len, self.long_len + self.response_len
            return [short] * (2 * self.pairs) + [long] * self.pairs
        if self.kind == "dpo-long":
            return [self.long_len + self.response_len] * (2 * self.pairs)
        return [self.long_len]

    @property
    def positions(self) -> int:
        """``T`` summed over rows."""
        return sum(self.rows)

    @property
    def response_tokens(self) -> int:
        """``N``: response tokens over all rows (what a compacting head pays for)."""
        return self.response_len * len(self.rows)

    def label(self, head: bool = True) -> str:
        """``solopo Ts=1024 Tl=16384 R=256 H=512 V=8192``; ``head=False`` drops H and V."""
        if self.kind == "solopo":
            shape = f"Ts={self.short_len} Tl={self.long_len}"
        elif self.kind == "dpo-long":
            shape = f"Tl={self.long_len}"
        else:
            shape = f"T={self.long_len}"
        return f"{self.kind} {shape} R={self.response_len}" + (
            f" H={self.hidden} V={self.vocab}" if head else ""
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"positions": self.positions, "response_tokens": self.response_tokens}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Workload:
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def _rows(
    n_rows: int, length: int, response: int, workload: Workload, generator: torch.Generator
) -> tuple:
    """``n_rows`` hidden rows ``(n_rows, length, H)`` and labels with the response at the end."""
    hidden = torch.randn(n_rows, length, workload.hidden, generator=generator)
    labels = torch.full((n_rows, length), IGNORE_INDEX, dtype=torch.long)
    labels[:, length - response :] = torch.randint(
        0, workload.vocab, (n_rows, response), generator=generator
    )
    return hidden, labels


def make_inputs(workload: Workload, device: torch.device, seed: int = 0) -> Inputs:
    """The tensors of one cell on ``device``: leaves that need gradients, labels, references
    (constants; zeros for ``dpo-long``, so that every peer there computes the same number).

    The weight is scaled so that logits have a spread like a trained head's (std ~0.6 at any H);
    the long chosen row of ``solopo`` carries the same response tokens as the short chosen row.
    """
    g = torch.Generator().manual_seed(seed)
    w = workload
    weight = torch.randn(w.vocab, w.hidden, generator=g) * (0.02 * math.sqrt(1024 / w.hidden))
    tensors: Inputs = {"weight": weight}
    if w.kind == "solopo":
        tensors["short_hidden"], tensors["short_labels"] = _rows(
            2 * w.pairs, w.short_len + w.response_len, w.response_len, w, g
        )
        tensors["long_hidden"], tensors["long_labels"] = _rows(
            w.pairs, w.long_len + w.response_len, w.response_len, w, g
        )
        tensors["long_labels"][:, -w.response_len :] = tensors["short_labels"][
            : w.pairs, -w.response_len :
        ]
        tensors["ref_short"] = -w.response_len * (2.0 + torch.rand(2 * w.pairs, generator=g))
        tensors["ref_long"] = -w.response_len * (2.0 + torch.rand(w.pairs, generator=g))
    elif w.kind == "dpo-long":
        tensors["pair_hidden"], tensors["pair_labels"] = _rows(
            2 * w.pairs, w.long_len + w.response_len, w.response_len, w, g
        )
        # Zero reference sums: Liger's DPO without a reference model then computes the same loss.
        tensors["ref_pair"] = torch.zeros(2 * w.pairs)
    else:
        tensors["hidden"], tensors["labels"] = _rows(1, w.long_len, w.response_len, w, g)
    out: Inputs = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not name.startswith("ref_"):
            tensor = tensor.to(device=device, dtype=w.torch_dtype).requires_grad_()
        else:
            tensor = tensor.to(device)
        out[name] = tensor
    return out


def leaves(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors whose gradients a step produces (cleared before every run)."""
    return [t for t in inputs.values() if t.requires_grad]


# ---------------------------------------------------------------------------------------------
# Shared pieces: from per-token log-probs to the workload's loss.


def _sequence_sums(
    token_logps: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of per-token log-probs (zeros at ignored positions) and response counts."""
    mask = labels != IGNORE_INDEX
    return (token_logps * mask).sum(-1), mask.sum(-1)


def loss_from_token_logps(
    workload: Workload, inputs: Inputs, per_row: list[torch.Tensor]
) -> torch.Tensor:
    """The workload's loss from per-token log-probs ``(rows, T)`` of each input tensor, in the
    order of :func:`row_inputs`; the objective is ``solopo_kernels.solopo_loss``."""
    from solopo_kernels import solopo_loss, value_checks_disabled

    options = dict(LOSS_OPTIONS[workload.loss_type])
    labels = [inputs[name] for _, name in row_inputs(workload)]
    sums = [_sequence_sums(t, lab) for t, lab in zip(per_row, labels)]
    if workload.kind == "logprobs":
        return sums[0][0].sum()
    # Same switch as for ours: the label-count check would add a host sync to some peers only.
    with value_checks_disabled():
        if workload.kind == "dpo-long":
            options["alpha"] = 0.0
            return solopo_loss(
                sums[0][0],
                sums[0][1],
                None,
                None,
                ref_short_logps=inputs["ref_pair"],
                loss_type=workload.loss_type,
                **options,
            ).loss
        return solopo_loss(
            sums[0][0],
            sums[0][1],
            sums[1][0],
            sums[1][1],
            ref_short_logps=inputs["ref_short"],
            ref_long_logps=inputs["ref_long"],
            loss_type=workload.loss_type,
            **options,
        ).loss


def row_inputs(workload: Workload) -> list[tuple[str, str]]:
    """``(hidden, labels)`` input names of the workload, in the order the loss reads them."""
    if workload.kind == "solopo":
        return [("short_hidden", "short_labels"), ("long_hidden", "long_labels")]
    if workload.kind == "dpo-long":
        return [("pair_hidden", "pair_labels")]
    return [("hidden", "labels")]


def _token_logps_step(
    workload: Workload,
    inputs: Inputs,
    token_logps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Step:
    """A step for peers that produce per-token log-probs of one ``(hidden, labels)`` input."""

    def step() -> torch.Tensor:
        per_row = [token_logps(inputs[h], inputs[lab]) for h, lab in row_inputs(workload)]
        loss = loss_from_token_logps(workload, inputs, per_row)
        loss.backward()
        return loss.detach()

    return step


# ---------------------------------------------------------------------------------------------
# The peers.


def _selective_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[labels]`` without a second ``T x V`` tensor: the target logit minus a
    log-sum-exp taken one row at a time (the memory-saving form TRL <= 1.14 uses on fp32 logits)."""
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return picked - lse


def build_plain(workload: Workload, inputs: Inputs, device: torch.device) -> Step:
    """Full logits ``hidden @ W.T`` at every position (the model's ``lm_head`` output, as HF and
    TRL <= 1.14 compute them), up-cast to fp32, then log-softmax at the labels."""
    w = inputs["weight"]

    def token_logps(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _selective_logps((hidden @ w.t()).float(), labels)

    return _token_logps_step(workload, inputs, token_logps)


def build_keep(workload: Workload, inputs: Inputs, device: torch.device) -> Step:
    """HF ``logits_to_keep`` (TRL's DPO path): logits only for the last ``K`` positions of each
    batch, ``K`` = the longest response span; the rest as :func:`build_plain`. Responses sit at
    the end of every row here, so ``K`` is exactly the response length (this peer's best case)."""
    w = inputs["weight"]

    def token_logps(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        first = (labels != IGNORE_INDEX).int().argmax(-1).min().item()  # host sync, as in TRL
        kept = _selective_logps((hidden[:, first:] @ w.t()).float(), labels[:, first:])
        return torch.nn.functional.pad(kept, (first, 0))

    return _token_logps_step(workload, inputs, token_logps)


def build_trl_chunked(workload: Workload, inputs: Inputs, device: torch.device) -> Step:
    """TRL 1.16 ``ChunkedLogProbFunction`` on the response rows ``hidden[mask]`` of all inputs in
    one call (as ``add_fused_lm_head`` calls it on CUDA; its CPU path scores every position),
    vocab chunk 32768 (TRL's default), no optional outputs."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    w = inputs["weight"]
    pairs = row_inputs(workload)

    def step() -> torch.Tensor:
        masks = [inputs[lab] != IGNORE_INDEX for _, lab in pairs]
        rows = torch.cat([inputs[h][m] for (h, _), m in zip(pairs, masks)])
        targets = torch.cat([inputs[lab][m] for (_, lab), m in zip(pairs, masks)])
        logps = ChunkedLogProbFunction.apply(rows, w, None, targets, 1.0, 32768, None, 1.0, ())[0]
        per_row = [
            logps.new_zeros(m.shape).masked_scatter(m, part)
            for m, part in zip(masks, logps.split([int(m.sum()) for m in masks]))
        ]
        loss = loss_from_token_logps(workload, inputs, per_row)
        loss.backward()
        return loss.detach()

    return step


def build_cce(workload: Workload, inputs: Inputs, device: torch.device) -> Step:
    """Apple Cut Cross-Entropy ``linear_cross_entropy(..., reduction="none")``: per-token NLL on
    the valid rows it compacts itself; ``impl="cce"`` on CUDA, ``"torch_compile"`` elsewhere."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device.type == "cuda" else "torch_compile"
    w = inputs["weight"]

    def token_logps(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return -linear_cross_entropy(
            hidden, w, labels, ignore_index=IGNORE_INDEX, reduction="none", impl=impl
        )

    return _token_logps_step(workload, inputs, token_logps)


_LIGER_CLASSES = {
    "dpo": "LigerFusedLinearDPOLoss",
    "simpo": "LigerFusedLinearSimPOLoss",
    "orpo": "LigerFusedLinearORPOLoss",
    "cpo": "LigerFusedLinearCPOLoss",
}


def build_liger(workload: Workload, inputs: Inputs, device: torch.device) -> Step:
    """Liger-Kernel's fused linear preference loss of the workload's ``loss_type`` (default
    ``compiled=True``; DPO with ``use_ref_model=False``, references being constants here).

    Liger takes one ``(2B, T, H)`` tensor of equal-length chosen/rejected rows and returns
    log-probs that are not differentiable, so for ``solopo`` it computes the preference term on the
    short pair only: the long row and SoLo-RA cannot be expressed (the table says so).
    """
    import liger_kernel.chunked_loss as liger

    options = LOSS_OPTIONS[workload.loss_type]
    kwargs: dict[str, Any] = {"beta": options["beta"], "compiled": True}
    if workload.loss_type == "dpo":
        kwargs["use_ref_model"] = False
    if workload.loss_type == "simpo":
        kwargs |= {"gamma": options["gamma"], "compute_nll_loss": False}
    loss_fn = getattr(liger, _LIGER_CLASSES[workload.loss_type])(**kwargs)
    name = "short" if workload.kind == "solopo" else "pair"
    hidden, labels, w = inputs[f"{name}_hidden"], inputs[f"{name}_labels"], inputs["weight"]

    def step() -> torch.Tensor:
        loss = loss_fn(w, hidden, labels)[0]
        loss.backward()
        return loss.detach()

    return step


def build_ours(
    workload: Workload, inputs: Inputs, device: torch.device, saved_logits_bytes: int | None = None
) -> Step:
    """solopo-kernels: ``fused_solopo_loss`` (``fused_linear_logprobs`` for ``logprobs``),
    ``backend="auto"`` (Triton on CUDA, tiled torch on the CPU), value checks off (no host sync;
    the peers do not validate labels either), with the default kernel options (a bounded
    saved-logits budget, 256 MiB) unless a budget is given."""
    import solopo_kernels as sk
    from solopo_kernels.ops import KernelOptions

    w = inputs["weight"]
    options = dict(LOSS_OPTIONS[workload.loss_type])
    options["kernel_options"] = (
        KernelOptions() if saved_logits_bytes is None else KernelOptions(saved_logits_bytes)
    )

    def loss() -> torch.Tensor:
        if workload.kind == "logprobs":
            return sk.fused_linear_logprobs(
                inputs["hidden"], w, inputs["labels"], kernel_options=options["kernel_options"]
            ).sum()
        if workload.kind == "dpo-long":
            options["alpha"] = 0.0
            return sk.fused_solopo_loss(
                w,
                inputs["pair_hidden"],
                inputs["pair_labels"],
                None,
                None,
                loss_type=workload.loss_type,
                ref_short_logps=inputs["ref_pair"],
                **options,
            ).loss
        return sk.fused_solopo_loss(
            w,
            inputs["short_hidden"],
            inputs["short_labels"],
            inputs["long_hidden"],
            inputs["long_labels"],
            loss_type=workload.loss_type,
            ref_short_logps=inputs["ref_short"],
            ref_long_logps=inputs["ref_long"],
            **options,
        ).loss

    def step() -> torch.Tensor:
        with sk.value_checks_disabled():
            value = loss()
        value.backward()
        return value.detach()

    return step


def build_ours_strict(workload: Workload, inputs: Inputs, device: torch.device) -> Step:
    """solopo-kernels with ``KernelOptions(saved_logits_bytes=0)``: nothing of size ``N x V`` is
    kept, every tile is recomputed in the backward (8 N H V FLOPs): the strict memory floor."""
    return build_ours(workload, inputs, device, saved_logits_bytes=0)


def build_ours_all_saved(workload: Workload, inputs: Inputs, device: torch.device) -> Step:
    """solopo-kernels with a saved-logits budget that holds every call's ``N x V`` float32 logits
    (all response tokens of the step): no recompute, 6 N H V FLOPs, the memory of the logits."""
    return build_ours(workload, inputs, device, saved_logits_bytes=4 * workload.response_tokens * workload.vocab)


@dataclass(frozen=True)
class Peer:
    """One implementation of the loss head.

    Attributes:
        name: command-line id; label: name in tables and plots.
        package: distribution whose version is recorded (and whose absence makes it unavailable).
        module: module imported to check availability.
        build: ``(workload, inputs, device) -> step``.
        compaction: whether it computes logits only at response tokens.
    """

    name: str
    label: str
    package: str
    module: str
    build: Callable[[Workload, Inputs, torch.device], Step]
    compaction: bool

    def computes(self, workload: Workload) -> str:
        """What this peer computes for ``workload`` (printed in the table)."""
        target = {
            "solopo": "SoLoPO loss",
            "dpo-long": f"{workload.loss_type.upper()} loss",
            "logprobs": "token log-probs",
        }
        if self.name == "liger":
            if workload.kind == "solopo":
                return f"{workload.loss_type.upper()} term on the short pair only (SoLo-RA not expressible)"
            if workload.kind == "logprobs":
                return "unsupported (pairs only)"
            return target[workload.kind] + ", all positions"
        where = (
            "response rows"
            if self.compaction
            else ("last K positions" if self.name == "keep" else "all positions")
        )
        return f"{target[workload.kind]}, logits at {where}"

    def unavailable(self, workload: Workload, device: torch.device) -> str | None:
        """Why this peer cannot run the cell (None when it can)."""
        if self.name == "liger" and workload.kind == "logprobs":
            return "Liger's preference losses take chosen/rejected pairs and return no differentiable per-token log-probs"
        try:
            importlib.import_module(self.module)
        except Exception as error:  # an ImportError, or a peer that breaks on import
            return f"{self.module} does not import: {type(error).__name__}: {error}"
        return None

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("plain", "plain PyTorch", "torch", "torch", build_plain, compaction=False),
        Peer("keep", "logits_to_keep", "torch", "torch", build_keep, compaction=False),
        Peer(
            "trl",
            "TRL chunked",
            "trl",
            "trl.kernels.chunked_logprob",
            build_trl_chunked,
            compaction=True,
        ),
        Peer(
            "liger",
            "Liger",
            "liger-kernel",
            "liger_kernel.chunked_loss",
            build_liger,
            compaction=False,
        ),
        Peer("cce", "CCE", "cut-cross-entropy", "cut_cross_entropy", build_cce, compaction=True),
        Peer(
            "ours",
            "solopo-kernels",
            "solopo-kernels",
            "solopo_kernels",
            build_ours,
            compaction=True,
        ),
        Peer(
            "ours-strict",
            "solopo-kernels, nothing saved",
            "solopo-kernels",
            "solopo_kernels",
            build_ours_strict,
            compaction=True,
        ),
        Peer(
            "ours-all",
            "solopo-kernels, every logit saved",
            "solopo-kernels",
            "solopo_kernels",
            build_ours_all_saved,
            compaction=True,
        ),
    )
}


def build_cell(name: str, cell: dict[str, Any], device: torch.device, seed: int) -> Cell:
    """The harness entry point (``registry="peers"``): peer ``name`` on workload ``cell``."""
    workload = Workload.from_dict(cell)
    peer = PEERS[name]
    reason = peer.unavailable(workload, device)
    if reason is not None:
        raise Unavailable(reason)
    inputs = make_inputs(workload, device, seed=seed)
    w = workload
    return Cell(
        peer.build(w, inputs, device),
        leaves(inputs),
        (w.kind, w.hidden, w.vocab, w.pairs, w.dtype, w.loss_type),
    )
