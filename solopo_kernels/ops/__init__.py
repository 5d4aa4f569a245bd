"""Per-token log-probs from hidden states and the lm_head weight: one dispatch point
(:mod:`.logprobs`) over one module per backend (:mod:`.torch_tiles`, :mod:`.triton_tiles`)."""

from .logprobs import BACKENDS, fused_linear_logprobs, response_logprobs

__all__ = ["BACKENDS", "fused_linear_logprobs", "response_logprobs"]
