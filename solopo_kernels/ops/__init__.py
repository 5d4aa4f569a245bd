"""Per-token log-probs from hidden states and the lm_head weight: one dispatch point
(:mod:`.logprobs`) over one module per backend (:mod:`.torch_tiles`, :mod:`.triton_tiles`), and
the kernel knobs (:class:`KernelOptions`, :mod:`.tiles`)."""

from .logprobs import BACKENDS, fused_linear_logprobs, response_logprobs
from .tiles import KernelOptions

__all__ = ["BACKENDS", "KernelOptions", "fused_linear_logprobs", "response_logprobs"]
