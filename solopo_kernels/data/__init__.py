"""SoLoPO data: short/long context pairs and preference pairs sampled on the short side.

Pipeline (also the ``solopo-data`` command line, :mod:`solopo_kernels.data.cli`):

1. :func:`read_examples` reads MuSiQue or generic QA JSONL into :class:`QAExample` records.
2. :func:`build_contexts` builds each example's short prompt (relevant passages only) and long
   prompt (the same passages among distractors, up to a target length in tokens).
3. :func:`sample_pairs` samples responses on the short prompts with a generation backend
   (:mod:`~solopo_kernels.data.backends`), judges them by sub-exact-match
   (:func:`sub_exact_match`) and writes chosen/rejected pairs with the long prompt alongside,
   resumably (:mod:`~solopo_kernels.data.store`).
4. :func:`evaluate` answers held-out short and long prompts greedily with a backend and
   reports the accuracy per context length (:mod:`~solopo_kernels.data.evaluate`), resumably;
   :func:`compare_runs` pairs two runs question by question.

Importing this package does not import torch, the kernels or the losses; the backends import
torch/transformers/vllm/openai when they are built.
"""

from .backends import (
    Generation,
    GenerationBackend,
    OpenAIBackend,
    SamplingServerError,
    TransformersBackend,
    VLLMBackend,
    load_backend,
    parse_vllm_args,
    prompt_seed,
)
from .contexts import (
    TEMPLATES,
    ContextBuilder,
    DistractorPool,
    PromptTemplate,
    TargetLengths,
    build_contexts,
    format_summary,
    prompt_text,
    summarize_lengths,
)
from .evaluate import (
    EvaluationConfig,
    EvaluationItem,
    EvaluationRun,
    accuracy_table,
    build_report,
    compare_runs,
    evaluate,
    evaluation_items,
    markdown_report,
    mcnemar_p,
)
from .judge import (
    extract_final_answer,
    load_judge,
    make_sub_em_judge,
    normalize_answer,
    sub_exact_match,
)
from .readers import Passage, QAExample, read_context_rows, read_examples
from .sampler import SamplingConfig, SamplingSummary, sample_pairs
from .store import ResumableOutput, example_key

__all__ = [
    "TEMPLATES",
    "ContextBuilder",
    "DistractorPool",
    "EvaluationConfig",
    "EvaluationItem",
    "EvaluationRun",
    "Generation",
    "GenerationBackend",
    "OpenAIBackend",
    "Passage",
    "PromptTemplate",
    "QAExample",
    "ResumableOutput",
    "SamplingConfig",
    "SamplingServerError",
    "SamplingSummary",
    "TargetLengths",
    "TransformersBackend",
    "VLLMBackend",
    "accuracy_table",
    "build_contexts",
    "build_report",
    "compare_runs",
    "evaluate",
    "evaluation_items",
    "example_key",
    "extract_final_answer",
    "format_summary",
    "load_backend",
    "load_judge",
    "make_sub_em_judge",
    "markdown_report",
    "mcnemar_p",
    "normalize_answer",
    "parse_vllm_args",
    "prompt_seed",
    "prompt_text",
    "read_context_rows",
    "read_examples",
    "sample_pairs",
    "sub_exact_match",
    "summarize_lengths",
]
