"""Padded against packed (``padding_free=True``) SoLoPO steps on a multi-scale batch.

    python benchmarks/run_packing.py                  # 4 pairs, long contexts 1K, 2K, 4K, 8K (~3 min)
    python benchmarks/run_packing.py --fsdp2          # + parameter all-gathers per step, FSDP2, 2 gloo ranks

A step is ``SoLoPOTrainer.compute_loss`` + backward, exactly as the trainer runs it, on one batch
of ``--pairs`` preference pairs whose long contexts have different lengths (``--long``, one per
pair, the way ``solopo-data``'s multi-scale contexts mix in a batch), a short context of
``--short`` tokens and responses of ``--response`` tokens (rejected ones half as long). The policy is a small Llama
made in code (``solopo_kernels.tiny_models.tiny_llama``, SDPA attention, float32) and the loss
SoLo-SimPO (reference-free: no reference forward), or SoLo-DPO with a reference model
(``--loss dpo``: one more forward of each kind).

* ``padded``: the short pair batch ``(2B, Ts_max)`` and the long batch ``(B, Tl_max)``, each padded
  to its longest row: two policy forwards.
* ``packed``: every sequence of the step end to end in one row: one policy forward.

Reported: tokens through the model per step (counted from the batch, deterministic), step time
and peak memory (``harness.py``: a child process per method, methods interleaved, peak RSS above
the step's baseline of weights and inputs), and with ``--fsdp2`` the number of parameter
all-gathers (and bytes gathered) per step under FSDP2 ``fully_shard`` on 2 gloo processes.

What CPU figures mean: transformers gives SDPA a dense block-diagonal boolean mask over the whole
packed row, so attention still costs ``L_pack^2`` work and an ``L_pack^2`` mask. On a GPU with
``attn_implementation="flash_attention_2"`` the varlen kernel skips the off-diagonal blocks and
attention costs the sum of the per-sequence ``n_i^2``, with no mask at all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from harness import Cell, CellResult, run_grid

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = ("padded", "packed")


@cache
def _tokenizer(vocab: int) -> Any:
    from solopo_kernels.tiny_models import tiny_tokenizer

    extra = len(tiny_tokenizer([]))
    return tiny_tokenizer([f"w{i}" for i in range(vocab - extra)])


def examples(cell: dict[str, Any], seed: int) -> list[dict[str, list[int]]]:
    """Pre-tokenized examples (what the trainer's dataset preparation produces): pair ``i`` has a
    long context of ``cell["long"][i]`` tokens; all share the short context length."""
    g = torch.Generator().manual_seed(seed)
    vocab, special = cell["vocab"], 16  # ids below 16 are special tokens and punctuation

    def ids(n: int) -> list[int]:
        return torch.randint(special, vocab, (n,), generator=g).tolist()

    rows = []
    for long_len in cell["long"]:
        rows.append(
            {
                "prompt_ids": ids(cell["short"]),
                "chosen_ids": ids(cell["response"]),
                "rejected_ids": ids(cell["response"] // 2),
                "long_prompt_ids": ids(long_len),
            }
        )
    return rows


def collate(cell: dict[str, Any], padding_free: bool, seed: int) -> dict[str, torch.Tensor]:
    from solopo_kernels.integrations.trl_data import DataCollatorForSoLoPO

    collator = DataCollatorForSoLoPO(
        pad_token_id=0, max_length=None, padding_free=padding_free, long_rows="chosen"
    )
    return collator(examples(cell, seed))


def tokens_through_model(batch: dict[str, torch.Tensor]) -> int:
    """Token positions the policy processes for this batch (padding included)."""
    if "packed_input_ids" in batch:
        return int((batch["packed_sequence_ids"] >= 0).sum())
    return batch["input_ids"].numel() + batch["long_input_ids"].numel()


def attention_work(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Query x key pairs the attention scores per layer and head (deterministic, from the batch):
    a padded batch scores ``rows x T^2`` each; a packed row ``L^2`` with a dense mask (SDPA/eager:
    transformers' block-diagonal mask) and ``sum of n_i^2`` with varlen kernels (flash-attn)."""
    if "packed_input_ids" in batch:
        ids = batch["packed_sequence_ids"]
        lengths = torch.bincount(ids[ids >= 0])
        rows = (ids >= 0).sum(-1)
        return {"dense": int((rows**2).sum()), "varlen": int((lengths**2).sum())}
    padded = sum(
        batch[key].shape[0] * batch[key].shape[1] ** 2 for key in ("input_ids", "long_input_ids")
    )
    return {"dense": padded, "varlen": padded}


def trainer(cell: dict[str, Any], padding_free: bool, output_dir: str) -> Any:
    """A SoLoPOTrainer around a fresh tiny Llama (seed 0), CPU, float32."""
    import copy

    from datasets import Dataset

    from solopo_kernels.integrations.trl import SoLoPOConfig, SoLoPOTrainer
    from solopo_kernels.tiny_models import tiny_llama

    tok = _tokenizer(cell["vocab"])
    policy = tiny_llama(
        tok,
        hidden_size=cell["hidden"],
        num_layers=cell["layers"],
        num_heads=cell["heads"],
        num_kv_heads=cell["kv_heads"],
        max_position_embeddings=max(cell["long"]) + cell["short"] + cell["response"] + 8,
    )
    policy.set_attn_implementation("sdpa")
    dpo = cell["loss"] == "dpo"
    args = SoLoPOConfig(
        output_dir=output_dir,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        save_strategy="no",
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataset_num_proc=None,
        max_length=None,
        solopo_loss_type=cell["loss"],
        solopo_alpha=3.0 if dpo else 1.0,
        beta=0.1 if dpo else 2.0,
        padding_free=padding_free,
    )
    data = Dataset.from_dict(
        {"prompt": ["w1 w2"], "long_prompt": ["w3 w1 w2"], "chosen": [" w4"], "rejected": [" w5"]}
    )
    return SoLoPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy).eval() if dpo else None,
        args=args,
        train_dataset=data,
        processing_class=tok,
    )


def build_cell(name: str, cell: dict[str, Any], device: torch.device, seed: int) -> Cell:
    """The harness entry point (``registry="run_packing"``)."""
    from solopo_kernels import value_checks_disabled

    t = trainer(cell, name == "packed", tempfile.mkdtemp(prefix="solopo-packing-"))
    model = t.model.to(device).train()
    if t.ref_model is not None:
        t.ref_model.to(device)
    batch = {k: v.to(device) for k, v in collate(cell, name == "packed", seed).items()}

    def step() -> torch.Tensor:
        with value_checks_disabled():
            loss = t.compute_loss(model, batch)
        loss.backward()
        return loss.detach()

    return Cell(step, list(model.parameters()), (name, tuple(cell["long"])))


# ------------------------------------------------------------------------------------ FSDP2
def fsdp2_worker(cell: dict[str, Any], out_path: str) -> None:
    """One padded and one packed step under FSDP2 (``fully_shard`` per decoder layer and on the
    root), counting the collectives that gather parameters; rank 0 writes the counts."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    counts: dict[str, dict[str, int]] = {}
    calls = {"all_gathers": 0, "bytes": 0}
    # FSDP2 gathers a unit's parameters with one collective (all_gather_single in recent torch,
    # all_gather_into_tensor in older releases): count both, and the bytes they fill.
    names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]
    originals = {n: getattr(dist, n) for n in names}

    def counting(original: Any) -> Any:
        def wrapper(output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls["all_gathers"] += 1
            calls["bytes"] += output.numel() * output.element_size()
            return original(output, *args, **kwargs)

        return wrapper

    for name in METHODS:
        with tempfile.TemporaryDirectory() as output_dir:
            t = trainer(cell, name == "packed", output_dir)  # sets up the gloo process group
        model = t.model
        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
        batch = collate(cell, name == "packed", seed=0)
        calls.update(all_gathers=0, bytes=0)
        for n in names:
            setattr(dist, n, counting(originals[n]))
        try:
            t.compute_loss(wrapped, batch).backward()
        finally:
            for n in names:
                setattr(dist, n, originals[n])
        counts[name] = dict(calls)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(counts))
    dist.barrier()
    dist.destroy_process_group()


def run_fsdp2(cell: dict[str, Any]) -> dict[str, dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp2.json"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO), str(HERE), env.get("PYTHONPATH")])
        )
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
        ]
        cmd += [str(Path(__file__).resolve()), "--fsdp2-worker", json.dumps(cell), str(out)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"FSDP2 run failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------ report
def report(
    cell: dict[str, Any],
    tokens: dict[str, int],
    results: dict[tuple[int, str], CellResult],
    fsdp2: dict[str, dict[str, int]] | None,
) -> str:
    from run_memory import _fmt_mem, _fmt_time

    lines = [
        "| layout | policy forwards / step | tokens through the model | step time | peak memory |",
        "|---|---|---|---|---|",
    ]
    forwards = {"padded": 2, "packed": 1}
    for name in METHODS:
        r = results[0, name]
        figures = (
            f"{_fmt_time(r.median_s)} | {_fmt_mem(r.peak_bytes)}"
            if r.status == "ok"
            else f"{r.status} | {r.status}"
        )
        lines.append(f"| {name} | {forwards[name]} | {tokens[name]:,} | {figures} |")
    a, b = results[0, "padded"], results[0, "packed"]
    work = {name: attention_work(collate(cell, name == "packed", seed=0)) for name in METHODS}
    lines += [
        "",
        "Attention scores per layer and head (query x key pairs, from the batch): padded "
        f"{work['padded']['dense']:,}; packed with a dense block-diagonal mask (SDPA/eager, what "
        f"the CPU runs) {work['packed']['dense']:,} "
        f"({work['packed']['dense'] / work['padded']['dense']:.2f}x); packed with varlen kernels "
        f"(flash-attn on a GPU) {work['packed']['varlen']:,} "
        f"({work['packed']['varlen'] / work['padded']['dense']:.2f}x).",
    ]
    lines.append("")
    lines.append(f"Packed / padded: tokens {tokens['packed'] / tokens['padded']:.2f}")
    if a.status == b.status == "ok":
        lines[-1] += (
            f", time {b.median_s / a.median_s:.2f}, memory {b.peak_bytes / a.peak_bytes:.2f}; "
            f"loss {a.loss:.6f} (padded) vs {b.loss:.6f} (packed)."
        )
    if fsdp2:
        lines += [
            "",
            "FSDP2 (`fully_shard` per decoder layer and on the root), 2 gloo processes, one step:",
            "",
            "| layout | parameter all-gathers / step | bytes gathered / step (rank 0) |",
            "|---|---|---|",
        ]
        for name in METHODS:
            lines.append(
                f"| {name} | {fsdp2[name]['all_gathers']} | {_fmt_mem(fsdp2[name]['bytes'])} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", default="1024,2048,4096,8192", help="long context of each pair")
    parser.add_argument("--short", type=int, default=512, help="short context tokens")
    parser.add_argument("--response", type=int, default=128, help="chosen response tokens")
    parser.add_argument("--loss", choices=("simpo", "dpo"), default="simpo")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-budget", type=float, default=60.0, dest="time_budget_s")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--fsdp2", action="store_true", help="also count FSDP2 all-gathers (2 gloo ranks)"
    )
    parser.add_argument(
        "--fsdp2-worker", nargs=2, metavar=("CELL_JSON", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tmp")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from run_memory import environment

    args = parse_args(argv)
    if args.fsdp2_worker:
        fsdp2_worker(json.loads(args.fsdp2_worker[0]), args.fsdp2_worker[1])
        return 0
    cell = {
        "long": [int(x) for x in args.long.split(",")],
        "short": args.short,
        "response": args.response,
        "loss": args.loss,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "vocab": args.vocab,
        # Sizes harness.dominates() compares.
        "pairs": len(args.long.split(",")),
        "positions": max(int(x) for x in args.long.split(",")),
    }
    tokens = {
        name: tokens_through_model(collate(cell, name == "packed", seed=0)) for name in METHODS
    }
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    results = run_grid(
        "run_packing",
        list(METHODS),
        [cell],
        device="cpu",
        threads=args.threads,
        warmup=1,
        repeats=args.repeats,
        time_budget_s=args.time_budget_s,
        mem_limit_bytes=None,
        timeout_s=1800,
    )
    fsdp2 = run_fsdp2(cell) if args.fsdp2 else None
    elapsed = time.perf_counter() - started
    env = environment("cpu", args.threads) | {"load_average_1min_at_start": load_before}
    text = "\n".join(
        [
            "## Padded vs packed SoLoPO step, multi-scale batch (cpu)",
            "",
            f"{cell['pairs']} pairs, long contexts {args.long} tokens (one per pair), short context "
            f"{args.short}, chosen response {args.response} and rejected {args.response // 2} tokens; "
            f"SoLo-{args.loss.upper() if args.loss == 'dpo' else 'SimPO'}; random Llama hidden {args.hidden}, "
            f"{args.layers} layers, vocab {args.vocab}, SDPA, float32. Machine: {env['device_name']}, "
            f"{args.threads} threads, torch {env['versions']['torch']}, {env['date']}; load average "
            f"{load_before:.1f} at start, {env['load_average_1min']:.1f} at end. Time: median of up to "
            f"{args.repeats} steps after a warm-up, layouts interleaved; memory: peak RSS above weights "
            "and inputs.",
            "",
            report(cell, tokens, results, fsdp2),
            "",
            f"Measured in {elapsed / 60:.1f} min.",
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "cell": cell,
        "tokens": tokens,
        "fsdp2": fsdp2,
        "results": {name: results[0, name].as_dict() for name in METHODS},
    }
    (args.out / "packing.json").write_text(json.dumps(payload, indent=1))
    (args.out / "packing.md").write_text(text + "\n")
    print(f"\nWrote {args.out}/packing.{{json,md}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
