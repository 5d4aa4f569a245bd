"""``solopo-data``: turn QA data into SoLoPO training data in two commands, and measure a model's
accuracy by context length before and after training with a third.

    solopo-data build-contexts --input qa.jsonl --output contexts.jsonl --tokenizer MODEL
    solopo-data sample-pairs --input contexts.jsonl --output pairs.jsonl --model MODEL
    solopo-data evaluate --input held-out-contexts.jsonl --output eval.json --model MODEL

Run ``solopo-data COMMAND --help`` for every option. ``python -m solopo_kernels.data`` is the
same program.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from .backends import SamplingServerError, TransformersBackend, load_backend, parse_vllm_args
from .contexts import TEMPLATES, TargetLengths, build_contexts, format_summary, summarize_lengths
from .evaluate import (
    EvaluationConfig,
    build_report,
    evaluate,
    evaluation_items,
    markdown_report,
)
from .judge import BUILTIN_JUDGES, DEFAULT_ANSWER_MARKER, load_judge
from .readers import read_context_rows, read_examples
from .sampler import SamplingConfig, sample_pairs

#: The bundled MuSiQue-schema sample (31 hand-written two-hop questions).
SAMPLE_PATH = Path(str(files("solopo_kernels.data") / "samples" / "musique_sample.jsonl"))
TINY = "tiny"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and shows the options' defaults (when they have one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = (
            action.default is None or action.default is False or action.default == argparse.SUPPRESS
        )
        if not quiet and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def tiny_tokenizer_for(texts: Iterable[str]) -> Any:
    """A :func:`solopo_kernels.tiny_models.tiny_tokenizer` whose vocabulary covers ``texts``.

    Word-level, so a text's token count does not depend on the vocabulary: a context file built
    with ``--tokenizer tiny`` keeps its lengths when ``sample-pairs --tokenizer tiny`` rebuilds
    the tokenizer from the contexts.
    """
    from tokenizers import pre_tokenizers

    from ..tiny_models import tiny_tokenizer

    splitter = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    words = {piece for text in texts for piece, _ in splitter.pre_tokenize_str(text.lower())}
    return tiny_tokenizer(sorted(words))


def load_tokenizer(name: str, texts: Iterable[str]) -> Any:
    """Load ``name`` with ``AutoTokenizer.from_pretrained``, or build the tiny one over ``texts``."""
    if name == TINY:
        return tiny_tokenizer_for(texts)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _prompt_texts(prompt: str | list[dict[str, str]]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else [message["content"] for message in prompt]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` to ``path`` through a temporary file, so ``path`` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(partial, path)


def build_contexts_command(args: argparse.Namespace) -> int:
    """Run ``build-contexts``; return the exit status."""
    examples = read_examples(args.input, args.input_format)[: args.limit]
    lengths = TargetLengths.parse(
        None if args.target_range else args.target_lengths, args.target_range
    )
    template = TEMPLATES[args.template]
    texts = [template.header, template.footer, template.answer_cue]
    for example in examples:
        texts += [example.question, *example.answers]
        texts += [passage.render() for passage in (*example.passages, *example.distractors)]
    tokenizer = load_tokenizer(args.tokenizer, texts)
    rows = build_contexts(
        examples,
        tokenizer,
        lengths,
        template=template,
        prompt_format=args.format,
        tolerance=args.tolerance,
        own_distractors=args.own_distractors,
        seed=args.seed,
        progress=not args.quiet,
    )
    _write_jsonl(Path(args.output), rows)
    print(f"wrote {len(rows)} rows to {args.output}")
    print(format_summary(summarize_lengths(rows, bins=4 if args.target_range else None)))
    return 0


def sample_pairs_command(args: argparse.Namespace) -> int:
    """Run ``sample-pairs``; return the exit status."""
    config = SamplingConfig(
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        include_gold=args.include_gold,
        keep_truncated=args.keep_truncated,
    )
    engine_options = _engine_options(args)  # bad engine flags fail before anything loads
    rows = read_context_rows(args.input)[: args.limit]
    judge = load_judge(args.judge, args.answer_marker)
    tokenizer_name = args.tokenizer or args.model
    texts = ["The answer is"]
    for row in rows:
        texts += [*_prompt_texts(row["prompt"]), *row["answers"]]
    tokenizer = load_tokenizer(tokenizer_name, texts)
    try:
        backend = _load_model_backend(args, tokenizer, texts, config.max_new_tokens, engine_options)
    except SamplingServerError as error:
        print(f"solopo-data sample-pairs: error: {error}", file=sys.stderr)
        return 1
    # Engine options and the server's address are not part of the resume identity: a run can be
    # resumed on another number of GPUs or against a server that moved. Nor is the input's path:
    # the store keys every finished example by its content, so a moved input resumes and a
    # rebuilt one (same ids, other contents) is refused.
    settings = {
        "model": args.model,
        "tokenizer": tokenizer_name,
        "judge": _judge_setting(args),
    }
    summary, status = _run_resumable(
        "sample-pairs",
        lambda: sample_pairs(
            rows,
            backend,
            tokenizer,
            args.output,
            config=config,
            judge=judge,
            settings=settings,
            overwrite=args.overwrite,
            progress=not args.quiet,
        ),
    )
    if status is not None:
        return status
    print(summary)
    return 0


def _run_resumable(command: str, work: Callable[[], Any]) -> tuple[Any, int | None]:
    """``(work(), None)``, or ``(None, exit status)`` after saying that the finished batches are
    saved: 130 on Ctrl-C, 1 when the generation server fails (``sample-pairs`` and ``evaluate``
    resume from their store)."""
    try:
        return work(), None
    except KeyboardInterrupt:
        print(
            "interrupted: finished batches are saved; rerun the same command to resume",
            file=sys.stderr,
        )
        return None, 130
    except SamplingServerError as error:
        print(
            f"solopo-data {command}: error: {error}\nfinished batches are saved; rerun the same "
            "command to resume",
            file=sys.stderr,
        )
        return None, 1


def _load_model_backend(
    args: argparse.Namespace,
    tokenizer: Any,
    texts: Sequence[str],
    max_new_tokens: int,
    engine_options: dict[str, Any],
) -> Any:
    """The generation backend of ``--model`` (``tiny``: a random tiny Llama built in memory on
    the transformers backend, long enough for ``texts`` plus ``max_new_tokens``)."""
    if args.model != TINY:
        return load_backend(
            args.backend,
            args.model,
            tokenizer,
            tokenizer_path=args.tokenizer,
            device=args.device,
            dtype=args.dtype,
            **engine_options,
        )
    if args.backend in ("vllm", "openai") or engine_options.get("vllm_args"):
        raise ValueError("--model tiny is built in memory and runs on the transformers backend")
    from ..tiny_models import tiny_llama

    longest = max(len(tokenizer(text)["input_ids"]) for text in texts)
    model = tiny_llama(tokenizer, max_position_embeddings=max(4096, longest + max_new_tokens))
    return TransformersBackend(model.to(args.device or "cpu"), tokenizer)


def _judge_setting(args: argparse.Namespace) -> str:
    """The judge as recorded in a run's settings."""
    if args.judge in BUILTIN_JUDGES:
        return f"{args.judge} after {args.answer_marker!r}"
    return args.judge


def evaluate_command(args: argparse.Namespace) -> int:
    """Run ``evaluate``; return the exit status."""
    output = Path(args.output)
    if output.suffix != ".json":
        raise ValueError(f"--output: the report is a .json file, got {args.output!r}")
    answers_path = Path(args.answers) if args.answers else output.with_suffix(".answers.jsonl")
    baseline = None
    if args.baseline is not None:
        try:
            baseline = json.loads(Path(args.baseline).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--baseline: cannot read {args.baseline!r} ({error})") from None
        if not isinstance(baseline, dict) or "answers" not in baseline:
            raise ValueError(f"--baseline: {args.baseline!r} is not a report of evaluate")
    config = EvaluationConfig(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size or 8, prompts=args.prompts
    )
    engine_options = _engine_options(args)
    files = [read_context_rows(path)[: args.limit] for path in args.input]
    items = evaluation_items(files, config.prompts)
    judge = load_judge(args.judge, args.answer_marker)
    tokenizer_name = args.tokenizer or args.model
    texts = ["The answer is"]
    for item in items:
        texts += [*_prompt_texts(item.prompt), *item.answers]
    tokenizer = load_tokenizer(tokenizer_name, texts)
    try:
        backend = _load_model_backend(args, tokenizer, texts, config.max_new_tokens, engine_options)
    except SamplingServerError as error:
        print(f"solopo-data evaluate: error: {error}", file=sys.stderr)
        return 1
    if args.batch_size is None and backend.name != "transformers":
        # the engines batch continuously: a call of many prompts keeps them busy
        config = dataclasses.replace(config, batch_size=64)
    settings = {
        "model": args.model,
        "tokenizer": tokenizer_name,
        "dtype": args.dtype,
        "judge": _judge_setting(args),
    }
    run, status = _run_resumable(
        "evaluate",
        lambda: evaluate(
            items,
            backend,
            tokenizer,
            answers_path,
            config=config,
            judge=judge,
            settings=settings,
            overwrite=args.overwrite,
            progress=not args.quiet,
        ),
    )
    if status is not None:
        return status
    report = build_report(
        run,
        {**settings, "max_new_tokens": config.max_new_tokens, "backend": backend.name},
        inputs=[str(path) for path in args.input],
        baseline=baseline,
        baseline_path=args.baseline,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, output)
    table = markdown_report(report)
    output.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    print(
        f"{run.answered} answers this run ({run.already_done} of {len(items)} were already done), "
        f"{run.generated_tokens} generated tokens, {run.seconds:.1f} s generating; report: "
        f"{output} and {output.with_suffix('.md')}; answers: {answers_path}"
    )
    return 0


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """``load_backend``'s engine keywords from the ``sample-pairs`` options of ``args``."""
    vllm_args = parse_vllm_args(args.vllm_arg or (), args.vllm_args)
    if vllm_args and args.backend not in ("vllm", "auto"):
        raise ValueError(
            f"--vllm-arg/--vllm-args: engine options need --backend vllm, not {args.backend}"
        )
    if args.backend != "openai":
        if args.base_url is not None:
            raise ValueError("--base-url: only the openai backend connects to a server")
        return {"vllm_args": vllm_args}
    if args.base_url is None:
        raise ValueError(
            "--base-url: the openai backend needs the server's URL (e.g. http://127.0.0.1:8000/v1)"
        )
    return {
        "openai_args": {
            "base_url": args.base_url,
            "api_key": args.api_key,
            "timeout": args.request_timeout,
            "max_retries": args.max_retries,
            "concurrency": args.concurrency,
            "requests": args.requests,
        }
    }


def _add_engine_options(sample: argparse.ArgumentParser) -> None:
    """The ``sample-pairs`` options of the vLLM engine and of the OpenAI-compatible server."""
    engine = sample.add_argument_group("vLLM engine (--backend vllm)")
    engine.add_argument(
        "--vllm-arg",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an engine option for vllm.LLM (any vllm.EngineArgs field), repeatable; VALUE is "
        "read as JSON where it parses, else as a string. E.g. --vllm-arg tensor_parallel_size=4 "
        "--vllm-arg max_model_len=8192 --vllm-arg enable_prefix_caching=true",
    )
    engine.add_argument(
        "--vllm-args",
        default=None,
        metavar="JSON",
        help="engine options as one JSON object, e.g. '{\"tensor_parallel_size\": 4}'; "
        "--vllm-arg wins where both set a key",
    )
    server = sample.add_argument_group("OpenAI-compatible server (--backend openai)")
    server.add_argument(
        "--base-url",
        default=None,
        help="the server's API root, e.g. http://127.0.0.1:8000/v1 (vllm serve); --model is "
        "the served model's name and --tokenizer (default: --model) must be its tokenizer",
    )
    server.add_argument(
        "--api-key",
        default=None,
        help="API key (default: $OPENAI_API_KEY, else a placeholder that local servers accept)",
    )
    server.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds per request attempt"
    )
    server.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="retries of a failed request (connection errors, 408, 409, 429, 5xx), with "
        "exponential backoff",
    )
    server.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    server.add_argument(
        "--requests",
        choices=["per-sample", "per-prompt"],
        default="per-sample",
        help="per-sample: one n=1 request per sample, seeded seed+j (independent samples on any "
        "server that honours seed); per-prompt: one request with n samples (fewer requests; "
        "independent where the server seeds sample j with seed+j, as vLLM does)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``solopo-data`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="solopo-data",
        description=(
            "Turn QA data into SoLoPO training data in two commands:\n\n"
            "  solopo-data build-contexts --input qa.jsonl --output contexts.jsonl --tokenizer MODEL\n"
            "  solopo-data sample-pairs --input contexts.jsonl --output pairs.jsonl --model MODEL\n\n"
            "and measure accuracy by context length before and after training:\n\n"
            "  solopo-data evaluate --input held-out-contexts.jsonl --output eval.json --model MODEL\n\n"
            "Run 'solopo-data COMMAND --help' for every option. 'python -m solopo_kernels.data' "
            "is the same program."
        ),
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build-contexts",
        help="build the short and long prompt of every QA example",
        formatter_class=_HelpFormatter,
        description=(
            "Build the short prompt (instruction + relevant passages + question) and the long\n"
            "prompt (the same passages, unchanged, at random depths among distractor passages,\n"
            "up to a target length in tokens of --tokenizer) of every example. Distractors come\n"
            "from a pool of all passages in the input; for each example the pool excludes its\n"
            "relevant passages, passages relevant to examples with the same answer, and passages\n"
            "that contain its answer. Output JSONL rows: id, prompt, long_prompt, answers,\n"
            "metadata (target_length, short_length, long_length, rho = short/long, depths of the\n"
            "relevant passages as fractions of the long prompt, num_distractors, ...). The same\n"
            "seed gives the same output. Prints the length distribution at the end.\n\n"
            f"Bundled sample: {SAMPLE_PATH}"
        ),
    )
    build.add_argument(
        "--input", required=True, help="QA file (JSONL) in the MuSiQue or generic schema"
    )
    build.add_argument("--output", required=True, help="where to write the context rows (JSONL)")
    build.add_argument(
        "--tokenizer",
        required=True,
        help="the target model's tokenizer: a local path or hub id (AutoTokenizer), or "
        f"'{TINY}' for an offline word-level tokenizer built from the input's words "
        "(demos and tests)",
    )
    build.add_argument(
        "--input-format",
        choices=["auto", "musique", "generic"],
        default="auto",
        help="input schema. musique: id, question, answer, answer_aliases, paragraphs "
        "[{title, paragraph_text, is_supporting}]. generic: id, question, answers, passages, "
        "optional distractors (passages are strings or {title, text}). auto: musique when a "
        "row has 'paragraphs'",
    )
    lengths = build.add_mutually_exclusive_group()
    lengths.add_argument(
        "--target-lengths",
        default="4k,8k,16k,32k",
        help="comma-separated long-prompt lengths in tokens; each example draws one uniformly "
        "(multi-scale). 'k' means x1024",
    )
    lengths.add_argument(
        "--target-range",
        default=None,
        metavar="LOW:HIGH",
        help="instead of --target-lengths, draw each example's length uniformly from this "
        "inclusive range (e.g. 6k:9k)",
    )
    build.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="a long prompt of target T has between T - max(1, floor(T * tolerance)) and T "
        "tokens; the last distractor is cut short if needed",
    )
    build.add_argument(
        "--template",
        choices=sorted(TEMPLATES),
        default="cot",
        help="instruction text: 'cot' asks for step-by-step reasoning ending with 'The answer "
        "is X.' (the paper samples chain-of-thought answers); 'qa' asks for the answer only",
    )
    build.add_argument(
        "--format",
        choices=["conversational", "standard"],
        default="conversational",
        help="conversational: prompts are [{'role': 'user', 'content': ...}] and lengths are "
        "counted on the chat template's rendering (needs a tokenizer with a chat template); "
        "standard: prompts are plain strings ending with 'Answer:'",
    )
    build.add_argument(
        "--own-distractors",
        choices=["pool", "first"],
        default="pool",
        help="pool: every distractor is drawn at random from the pool (the paper's random "
        "distractors); first: an example's own distractors (MuSiQue's non-supporting "
        "paragraphs, the generic 'distractors') are used first, then the pool",
    )
    build.add_argument("--seed", type=int, default=0, help="random seed")
    build.add_argument(
        "--limit", type=int, default=None, help="only the first N examples (the pool too)"
    )
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(handler=build_contexts_command)

    sample = commands.add_parser(
        "sample-pairs",
        help="sample responses on the short prompts and write chosen/rejected pairs",
        formatter_class=_HelpFormatter,
        description=(
            "Generate --num-samples responses to each short prompt, judge each against the gold\n"
            "answers, and write chosen = the first correct response and rejected = the first\n"
            "incorrect one, with the long prompt alongside. Examples without both are skipped\n"
            "and counted. Output JSONL rows (TRL's preference format plus long_prompt): id,\n"
            "prompt, long_prompt, chosen, rejected, metadata. The output is appended and synced\n"
            "after every batch, next to OUTPUT.progress; rerunning the same command after an\n"
            "interruption resumes without duplicating or losing rows."
        ),
    )
    sample.add_argument("--input", required=True, help="context rows written by build-contexts")
    sample.add_argument("--output", required=True, help="where to write the pairs (JSONL)")
    sample.add_argument(
        "--model",
        required=True,
        help="the policy model: a local path or hub id, or 'tiny' for a randomly initialised "
        "tiny Llama built in memory (offline demos; it cannot answer, see --include-gold)",
    )
    sample.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer path or hub id if not the model's; 'tiny' builds the offline word-level "
        "tokenizer from the input's words. Use the tokenizer that build-contexts used",
    )
    sample.add_argument(
        "--backend",
        choices=["auto", "transformers", "vllm", "openai"],
        default="auto",
        help="generation backend; auto uses vLLM when it is installed and a GPU is available, "
        "else transformers; openai sends the prompts to a running server (--base-url)",
    )
    _add_engine_options(sample)
    sample.add_argument(
        "--num-samples", type=int, default=32, help="responses sampled per short prompt"
    )
    sample.add_argument(
        "--temperature", type=float, default=0.85, help="sampling temperature (> 0)"
    )
    sample.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    sample.add_argument("--top-k", type=int, default=0, help="top-k cut (0 = off)")
    sample.add_argument(
        "--max-new-tokens", type=int, default=256, help="longest response, in tokens"
    )
    sample.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="prompts per generation call (each with --num-samples responses); part of the "
        "resume settings because batches carry the seeds",
    )
    sample.add_argument(
        "--seed", type=int, default=0, help="random seed (one derived seed per batch)"
    )
    sample.add_argument(
        "--judge",
        default="sub-em",
        metavar="{sub-em,final-span,MODULE:FUNCTION}",
        help="sub-em: sub-exact-match, a normalised gold answer or alias found as "
        "whole words in the response, which a random model's word salad can pass by chance; "
        "final-span: stricter, the answer must also be the response's final words; or your own "
        "judge, called as FUNCTION(response, answers) -> bool",
    )
    sample.add_argument(
        "--answer-marker",
        default=DEFAULT_ANSWER_MARKER,
        help="the built-in judges only read what follows the last occurrence of this phrase "
        "(the final answer of a chain of thought), or the whole response when it is absent; "
        "'' judges the whole response",
    )
    sample.add_argument(
        "--include-gold",
        action="store_true",
        help="also offer 'The answer is <gold>.' as a candidate after the samples, so every "
        "example has a correct response. For demos with models that cannot answer (--model "
        "tiny): the chosen response is then the reference, not the model's (off-policy); "
        "metadata.chosen_source says which",
    )
    sample.add_argument(
        "--keep-truncated",
        action="store_true",
        help="also judge samples cut by --max-new-tokens (no end-of-sequence token: unfinished "
        "answers), which are otherwise never chosen or rejected (metadata.num_truncated counts "
        "them). For models that never stop, such as --model tiny",
    )
    sample.add_argument(
        "--device", default=None, help="torch device for transformers (default: cuda if available)"
    )
    sample.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="model weights' dtype",
    )
    sample.add_argument("--limit", type=int, default=None, help="only the first N context rows")
    sample.add_argument(
        "--overwrite", action="store_true", help="discard an existing output instead of resuming"
    )
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sample.set_defaults(handler=sample_pairs_command)
    _add_evaluate_parser(commands)
    return parser


def _add_evaluate_parser(commands: Any) -> None:
    """The ``evaluate`` command's options."""
    evaluate_parser = commands.add_parser(
        "evaluate",
        help="accuracy by context length: greedy answers to the short and long prompts",
        formatter_class=_HelpFormatter,
        description=(
            "Answer the short prompt and the long prompt of every row of the context files\n"
            "(build-contexts output; use held-out questions, not the ones the pairs came from)\n"
            "greedily, judge each answer against the gold answers with the sample-pairs judges,\n"
            "and report the accuracy per context length (the rows' target lengths) with its\n"
            "standard error. An example in several files (one per length) has its short prompt\n"
            "answered once. Prompts are grouped by length and batched. Answers are appended and\n"
            "synced after every batch (ANSWERS, with ANSWERS.progress): rerunning the same\n"
            "command after an interruption resumes. Writes OUTPUT (JSON: settings, accuracy per\n"
            "length, every answer) and OUTPUT with .md (the table). Run it before and after\n"
            "training; --baseline BEFORE.json adds the paired comparison per length (questions\n"
            "only one run gets right, McNemar's exact p)."
        ),
    )
    evaluate_parser.add_argument(
        "--input",
        required=True,
        action="append",
        help="context rows written by build-contexts; repeat for several files (e.g. one per "
        "length)",
    )
    evaluate_parser.add_argument(
        "--output", required=True, help="the report (.json); the table goes beside it (.md)"
    )
    evaluate_parser.add_argument(
        "--answers",
        default=None,
        help="the resumable answers (JSONL; default: OUTPUT with .answers.jsonl)",
    )
    evaluate_parser.add_argument(
        "--model",
        required=True,
        help="the model: a local path or hub id (a fine-tuned one: its merged folder), or "
        "'tiny' for a random tiny Llama built in memory (plumbing checks)",
    )
    evaluate_parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer path or hub id if not the model's ('tiny': the offline word-level one); "
        "use the tokenizer that build-contexts used",
    )
    evaluate_parser.add_argument(
        "--backend",
        choices=["auto", "transformers", "vllm", "openai"],
        default="auto",
        help="generation backend, as for sample-pairs",
    )
    _add_engine_options(evaluate_parser)
    evaluate_parser.add_argument(
        "--prompts",
        choices=["both", "short", "long"],
        default="both",
        help="which prompts of each row to answer",
    )
    evaluate_parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="longest answer, in tokens"
    )
    evaluate_parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="prompts per generation call (default: 8 on transformers, 64 on the engines); "
        "greedy answers do not depend on it, so a run may resume with another",
    )
    evaluate_parser.add_argument(
        "--judge",
        default="sub-em",
        metavar="{sub-em,final-span,MODULE:FUNCTION}",
        help="as for sample-pairs",
    )
    evaluate_parser.add_argument(
        "--answer-marker", default=DEFAULT_ANSWER_MARKER, help="as for sample-pairs"
    )
    evaluate_parser.add_argument(
        "--baseline",
        default=None,
        metavar="REPORT.json",
        help="another run's report on the same files: adds the paired comparison per length",
    )
    evaluate_parser.add_argument(
        "--device", default=None, help="torch device for transformers (default: cuda if available)"
    )
    evaluate_parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="model weights' dtype (part of the resume settings)",
    )
    evaluate_parser.add_argument(
        "--limit", type=int, default=None, help="only the first N rows of each input"
    )
    evaluate_parser.add_argument(
        "--overwrite", action="store_true", help="discard existing answers instead of resuming"
    )
    evaluate_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate_parser.set_defaults(handler=evaluate_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``solopo-data``; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"solopo-data {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
