"""One full training step of SoLoPO against long-context DPO and short-only DPO (the paper's
efficiency claim, measured).

    python benchmarks/run_training_step.py                     # Tl = 2K..16K, a few minutes on 2 cores
    python benchmarks/run_training_step.py --max-mem-gb 1.5 --long 2048,4096,8192,16384,32768

A step is policy forward + loss + backward of a small Llama made in code
(``solopo_kernels.tiny_models.tiny_llama``, SDPA attention, no gradient checkpointing):

* ``solopo``: forward of the short pair ``x_short + y_w``, ``x_short + y_l`` (2 rows of ``Ts + R``
  tokens: context, then response) and of the long chosen row ``x_long + y_w`` (1 row of
  ``Tl + R``), then ``fused_solopo_loss`` (SoLo-DPO, alpha = 3);
* ``dpo-long``: forward of the long pair ``x_long + y_w``, ``x_long + y_l`` (2 rows of ``Tl + R``), then
  the DPO loss (``fused_solopo_loss`` with alpha = 0 on the long pair: the same fused head, so the
  comparison isolates what SoLoPO changes: which sequences go through the model);
* ``dpo-short``: forward of the short pair only, then the DPO loss (the floor SoLoPO adds one
  long forward to).

Reference log-probs are precomputed constants for all three (a reference pass is the same extra
work for each, done once per dataset). Peak memory (activations, parameter gradients, head) and
time are measured as in ``run_memory.py`` (``harness.py``: peak RSS above the step's baseline of
weights and inputs, a child process per method, methods interleaved).

Reported: step time and peak memory per long length; the measured time ratio SoLoPO / long DPO
beside the attention cost model ``(2 rho^2 + 1) / 2`` (rho = Ts / Tl, the paper's N^2 model) and
the token-count model ``(2 rho + 1) / 2`` (for the layers that are linear in length); and the
largest long length whose step fits ``--max-mem-gb`` (measured, and from a linear fit of peak
memory in Tl). The paper reports 9K -> 19K tokens of trainable length and 26-52 % less runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from harness import Cell, CellResult, run_grid

HERE = Path(__file__).resolve().parent
METHODS = ("solopo", "dpo-long", "dpo-short")
LABELS = {"solopo": "SoLoPO", "dpo-long": "long-context DPO", "dpo-short": "short-only DPO"}
IGNORE_INDEX = -100
ALPHA, BETA = 3.0, 0.1  # the paper's SoLo-DPO setting


@cache
def model(
    vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, max_len: int, device: str
) -> Any:
    """The policy (built once per child process): a random Llama with SDPA attention."""
    from solopo_kernels.tiny_models import tiny_llama, tiny_tokenizer

    # tiny_tokenizer adds special tokens and punctuation to the words: fill up to `vocab`.
    extra = len(tiny_tokenizer([]))
    tokenizer = tiny_tokenizer([f"w{i}" for i in range(vocab - extra)])
    policy = tiny_llama(
        tokenizer,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        max_position_embeddings=max_len,
    )
    policy.set_attn_implementation("sdpa")
    return policy.to(device).train()


def _batch(rows: int, length: int, response: int, vocab: int, generator: torch.Generator) -> tuple:
    """Token ids ``(rows, length)`` and shifted labels with the last ``response`` tokens as the
    response (position ``t`` predicts token ``t + 1``)."""
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    labels[:, length - response - 1 : length - 1] = ids[:, length - response :]
    return ids, labels


def build_cell(name: str, cell: dict[str, Any], device: torch.device, seed: int) -> Cell:
    """The harness entry point (``registry="run_training_step"``): method ``name`` at ``cell``."""
    from solopo_kernels import fused_solopo_loss, value_checks_disabled

    policy = model(
        cell["vocab"],
        cell["hidden"],
        cell["layers"],
        cell["heads"],
        cell["kv_heads"],
        cell["max_len"],
        str(device),
    )
    g = torch.Generator().manual_seed(seed)
    ts, tl, r, v = cell["short_len"], cell["long_len"], cell["response_len"], cell["vocab"]
    # Rows are context + response: Ts and Tl are the context lengths (rho = Ts / Tl, as in the paper).
    short_ids, short_labels = _batch(2, ts + r, r, v, g)
    long_ids, long_labels = _batch(2 if name == "dpo-long" else 1, tl + r, r, v, g)
    if name == "solopo":  # the long chosen row answers with the short chosen row's response
        long_ids[0, -r:] = short_ids[0, -r:]
        long_labels[0, tl - 1 : tl + r - 1] = long_ids[0, tl:]
    ref = -r * (2.0 + torch.rand(2, generator=g))
    tensors = [t.to(device) for t in (short_ids, short_labels, long_ids, long_labels, ref)]
    short_ids, short_labels, long_ids, long_labels, ref = tensors
    weight = policy.lm_head.weight

    def hidden(ids: torch.Tensor) -> torch.Tensor:
        return policy.model(input_ids=ids).last_hidden_state

    def loss() -> torch.Tensor:
        if name == "solopo":
            return fused_solopo_loss(
                weight,
                hidden(short_ids),
                short_labels,
                hidden(long_ids),
                long_labels,
                alpha=ALPHA,
                beta=BETA,
                ref_short_logps=ref,
                ref_long_logps=ref[:1],
            ).loss
        ids, labels = (long_ids, long_labels) if name == "dpo-long" else (short_ids, short_labels)
        return fused_solopo_loss(
            weight, hidden(ids), labels, None, None, alpha=0.0, beta=BETA, ref_short_logps=ref
        ).loss

    def step() -> torch.Tensor:
        with value_checks_disabled():
            value = loss()
        value.backward()
        return value.detach()

    return Cell(step, list(policy.parameters()), (name, cell["short_len"], cell["response_len"]))


def cost_models(short_len: int, long_len: int) -> dict[str, float]:
    """SoLoPO / long-DPO cost under the attention (N^2) and token-count (N) models."""
    rho = short_len / long_len
    return {"rho": rho, "attention": (2 * rho**2 + 1) / 2, "tokens": (2 * rho + 1) / 2}


def fit_max_length(points: list[tuple[int, int]], cap_bytes: int) -> int | None:
    """Largest Tl with a predicted peak under ``cap_bytes``, from a least-squares line through the
    measured (Tl, peak) points (activation memory is linear in length with SDPA attention)."""
    if len(points) < 2:
        return None
    xs, ys = zip(*points, strict=True)
    slope, intercept = statistics.linear_regression(xs, ys)
    if slope <= 0:
        return None
    return int((cap_bytes - intercept) / slope)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--long", default="2048,4096,8192,16384", help="long-context lengths Tl")
    parser.add_argument(
        "--short", type=int, default=1024, help="short-context length Ts (the paper: ~1.1K)"
    )
    parser.add_argument(
        "--response", type=int, default=256, help="response tokens after each context"
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument(
        "--max-mem-gb", type=float, default=0.5, help="memory cap for the max-length report"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per method and length")
    parser.add_argument("--time-budget", type=float, default=20.0, dest="time_budget_s")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tmp")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.long = sorted(int(x) for x in args.long.split(","))
    return args


def report(
    args: argparse.Namespace,
    cells: list[dict[str, Any]],
    results: dict[tuple[int, str], CellResult],
) -> str:
    """Markdown: per-length table, max length under the cap, cost model beside measured ratios."""
    from run_memory import _fmt_mem, _fmt_time

    def fig(index: int, method: str) -> str:
        r = results[index, method]
        return (
            f"{_fmt_time(r.median_s)} / {_fmt_mem(r.peak_bytes)}" if r.status == "ok" else r.status
        )

    lines = [
        "| Tl | rho = Ts/Tl | " + " | ".join(f"{LABELS[m]} time / peak" for m in METHODS) + " | "
        "SoLoPO / long DPO: time (model (2rho^2+1)/2; (2rho+1)/2) | memory |",
        "|" + "---|" * (len(METHODS) + 4),
    ]
    for i, cell in enumerate(cells):
        models = cost_models(cell["short_len"], cell["long_len"])
        s, d = results[i, "solopo"], results[i, "dpo-long"]
        if s.status == "ok" and d.status == "ok":
            time_ratio = (
                f"{s.median_s / d.median_s:.2f} ({models['attention']:.2f}; {models['tokens']:.2f})"
            )
            mem_ratio = f"{s.peak_bytes / d.peak_bytes:.2f}"
        else:
            time_ratio = f"n/a ({models['attention']:.2f}; {models['tokens']:.2f})"
            mem_ratio = "n/a"
        lines.append(
            f"| {cell['long_len']} | {models['rho']:.3f} | "
            + " | ".join(fig(i, m) for m in METHODS)
            + f" | {time_ratio} | {mem_ratio} |"
        )
    cap = int(args.max_mem_gb * 2**30)
    lines += [
        "",
        f"Largest long context Tl whose step fits {args.max_mem_gb:g} GiB (peak above weights and inputs):",
        "",
    ]
    for method in ("solopo", "dpo-long"):
        points = [
            (c["long_len"], results[i, method].peak_bytes)
            for i, c in enumerate(cells)
            if results[i, method].status == "ok"
        ]
        measured = max((tl for tl, peak in points if peak <= cap), default=None)
        fitted = fit_max_length(points, cap)
        lines.append(
            f"- {LABELS[method]}: {measured if measured else 'none'} of the measured lengths; "
            f"{'~' + str(fitted) if fitted else 'n/a'} from a linear fit of peak memory in Tl"
        )
    return "\n".join(lines)


def plot(
    cells: list[dict[str, Any]], results: dict[tuple[int, str], CellResult], path: Path
) -> None:
    import matplotlib
    from run_memory import set_length_axis

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m_index, method in enumerate(METHODS):
        pts = [
            (c["long_len"], results[i, method])
            for i, c in enumerate(cells)
            if results[i, method].status == "ok"
        ]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        axes[0].plot(
            xs, [r.median_s for _, r in pts], marker="o", color=f"C{m_index}", label=LABELS[method]
        )
        axes[1].plot(
            xs,
            [r.peak_bytes / 2**20 for _, r in pts],
            marker="o",
            color=f"C{m_index}",
            label=LABELS[method],
        )
    for ax, ylabel in zip(axes, ("step time (s)", "peak step memory (MiB)"), strict=True):
        set_length_axis(ax, [c["long_len"] for c in cells])
        ax.set_yscale("log")
        ax.set_xlabel("long-context length Tl (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    c = cells[0]
    fig.suptitle(
        f"Training step, Llama H={c['hidden']} x {c['layers']} layers, V={c['vocab']}, Ts={c['short_len']}, R={c['response_len']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    from run_memory import available_memory_bytes, environment
    from tqdm import tqdm

    args = parse_args(argv)
    shared = {
        "kind": "train",
        "short_len": args.short,
        "response_len": args.response,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "vocab": args.vocab,
        "max_len": max(args.long + [args.short]) + args.response,
        # The sizes harness.dominates() compares (an OOM at Tl skips longer Tl).
        "pairs": 1,
        "response_tokens": args.response,
    }
    cells = [shared | {"long_len": tl, "positions": tl} for tl in args.long]
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    bar = tqdm(total=len(cells) * len(METHODS), desc="training steps", unit="cell", file=sys.stderr)

    def progress(index: int, method: str, result: CellResult) -> None:
        bar.set_postfix_str(
            f"Tl={cells[index]['long_len']} | {method}: {result.status}", refresh=False
        )
        bar.update()

    results = run_grid(
        "run_training_step",
        list(METHODS),
        cells,
        device=args.device,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        time_budget_s=args.time_budget_s,
        # Protects the machine: a step beyond 90% of the available RAM fails as "OOM".
        mem_limit_bytes=None
        if args.device.startswith("cuda")
        else int(0.9 * available_memory_bytes()),
        timeout_s=args.timeout,
        on_result=progress,
    )
    bar.close()
    elapsed = time.perf_counter() - started
    env = environment(args.device, args.threads) | {"load_average_1min_at_start": load_before}
    text = "\n".join(
        [
            f"## One training step: SoLoPO vs long-context DPO ({args.device})",
            "",
            f"Policy: random Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
            f"({args.kv_heads} KV), vocab {args.vocab}, SDPA attention, float32; Ts = {args.short}, "
            f"response {args.response} tokens after each context, one pair; reference log-probs precomputed. "
            f"Machine: {env['device_name']}, {args.threads} threads; torch {env['versions']['torch']}; {env['date']}; "
            f"load average {load_before:.1f} at start, {env['load_average_1min']:.1f} at end. "
            f"Time: median of up to {args.repeats} steps after warm-up, methods interleaved; "
            "memory: peak above weights and inputs (activations, gradients, loss head).",
            "",
            report(args, cells, results),
            "",
            "The paper (Qwen2.5-7B, GPU): trainable length 9K -> 19K tokens, 26-52 % less runtime at 9K.",
            "",
            f"Measured in {elapsed / 60:.1f} min.",
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "elapsed_s": elapsed,
        "cells": [
            {
                "cell": cells[i],
                "method": m,
                "cost_models": cost_models(cells[i]["short_len"], cells[i]["long_len"]),
            }
            | r.as_dict()
            for (i, m), r in sorted(results.items())
        ],
    }
    (args.out / "training_step.json").write_text(json.dumps(payload, indent=1))
    (args.out / "training_step.md").write_text(text + "\n")
    if not args.no_plot:
        plot(cells, results, args.out / "training_step.png")
    print(f"\nWrote {args.out}/training_step.{{json,md,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
