"""Peak memory and wall time of loss heads, each peer in its own child process, side by side.

How memory is measured, and why it is honest:

* **CPU**: the peak resident set size (RSS) of the peer's process during one forward+backward,
  above the RSS just before it. Linux lets a process reset its own RSS high-water mark (``echo 5
  > /proc/self/clear_refs``), so every measured run starts from a fresh mark, after the inputs
  exist, the warm-up ran (``torch.compile`` and library start-up are not loss-head memory) and the
  previous run's gradients were dropped. Children run with a fixed glibc mmap threshold
  (``MALLOC_MMAP_THRESHOLD_``): every allocation of 128 KiB or more gets its own mapping and goes
  back to the OS when freed, so a buffer freed by one run cannot be silently reused by the next
  and RSS follows the live tensors. RSS also counts what an allocator-level tally would miss
  (oneDNN/MKL scratch, ``torch.compile`` runtime buffers), and only pages actually touched, which
  is what a machine runs out of. The gradients a step returns (``dW``, ``dhidden``) are part of
  every peer's figure; the inputs are not.
* **CUDA**: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, above the
  bytes allocated before the run.

Why child processes: a peer that runs out of memory or crashes takes down its child, not the
benchmark. Each child has a memory limit (``RLIMIT_DATA``): an allocation beyond it fails with an
error reported as "OOM", and a child killed by the kernel is reported as "OOM" too; the next cell
gets a fresh child. After an OOM, the peer's cells that are at least as large in every size are
reported as OOM without being run. One child per peer (not per cell) lives through the whole grid,
because ``import torch`` costs 2-4 s on two cores; the reset high-water mark and the mmap
threshold keep its cells independent.

Why side by side: the children take turns, one timed run each per round (the order rotates
between rounds), so that load from other processes or clock drift hits every peer alike and the
ratios stay meaningful on a shared machine. Time is the median of up to ``repeats`` timed runs
per peer and cell; a peer stops getting rounds once its timed runs of the cell took
``time_budget_s`` (at least one), so a slow peer at a large shape does not dominate the run.

Warm-up: a child runs ``warmup`` untimed runs the first time it meets a static signature (H, V,
pairs, dtype, loss type, kind), not at every cell: Liger marks the sequence length dynamic and
CCE compiles with ``dynamic=True``, so a new length reuses the compiled graphs (checked: the first
run at a new length is as fast as the next ones), and the eager peers have nothing to warm up per
shape (every run maps and touches its memory afresh, by design of the measurement).

Run as a script, this module is the child.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

MMAP_THRESHOLD = 128 * 1024
_TAG = "@@harness "


@dataclass
class CellResult:
    """The outcome of one (peer, workload) cell.

    Attributes:
        status: ``ok``, ``OOM``, ``error``, ``timeout`` or ``unavailable``.
        peak_bytes: peak memory of one forward+backward above the pre-run baseline (max over the
            timed runs).
        peaks_bytes: that peak in each timed run (their spread is the measurement's noise, which
            the report prints).
        baseline_bytes: memory in use before the run (inputs, weights, libraries).
        grad_bytes: size of the gradients the step returns (``dW``, ``dhidden``): the same for
            every peer, and the floor of ``peak_bytes``.
        times_s: wall time of each timed run.
        loss: the loss value of the last run (a cross-check between peers).
        reason: why the cell is not ``ok``.
    """

    status: str
    peak_bytes: int | None = None
    peaks_bytes: list[int] = field(default_factory=list)
    baseline_bytes: int | None = None
    grad_bytes: int | None = None
    times_s: list[float] = field(default_factory=list)
    loss: float | None = None
    reason: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"median_s": self.median_s}


def dominates(big: dict[str, Any], small: dict[str, Any]) -> bool:
    """Whether workload ``big`` is at least as large as ``small`` in every size that costs memory."""
    sizes = ("positions", "response_tokens", "hidden", "vocab", "pairs")
    return big["kind"] == small["kind"] and all(big[k] >= small[k] for k in sizes)


def is_oom(error: BaseException) -> bool:
    """Out of memory on any device: MemoryError, torch.OutOfMemoryError or a failed allocation."""
    text = str(error).lower()
    return (
        isinstance(error, MemoryError)
        or type(error).__name__ == "OutOfMemoryError"
        or any(
            s in text for s in ("can't allocate memory", "cannot allocate memory", "out of memory")
        )
    )


# ---------------------------------------------------------------------------------------------
# Child side.


class RssTracker:
    """RSS high-water mark of this process (Linux), reset before each run."""

    _status = Path("/proc/self/status")
    _clear = Path("/proc/self/clear_refs")

    def _read_kib(self, key: str) -> int:
        for line in self._status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{key} not found in /proc/self/status")

    def start(self) -> int:
        self._clear.write_text("5")  # 5: reset the peak RSS to the current RSS
        return self._read_kib("VmRSS") * 1024

    def peak(self) -> int:
        return self._read_kib("VmHWM") * 1024


class CudaTracker:
    """The CUDA caching allocator's peak, reset before each run."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.device = torch, device

    def start(self) -> int:
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        return self.torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        self.torch.cuda.synchronize(self.device)
        return self.torch.cuda.max_memory_allocated(self.device)


class Unavailable(Exception):
    """Raised by a registry's ``build_cell`` when the implementation cannot run the cell."""


@dataclass
class Cell:
    """What a registry's ``build_cell(name, cell, device, seed)`` returns.

    Attributes:
        step: runs forward + backward once and returns the (detached) scalar loss.
        grads: tensors whose ``.grad`` is dropped before every run (so each run allocates its
            gradients, as a training step does).
        signature: cells with equal signatures share one warm-up (see the module docstring).
    """

    step: Callable[[], Any]
    grads: list[Any]
    signature: Hashable


def make_tracker(device: Any) -> RssTracker | CudaTracker:
    """The memory tracker of ``device`` (a ``torch.device``)."""
    return CudaTracker(device) if device.type == "cuda" else RssTracker()


class ChildState:
    """The child's current cell and the signatures already warmed up.

    ``registry`` names the module (next to this one) whose ``build_cell`` makes the cells:
    ``peers`` for the loss heads, ``run_training_step`` for whole training steps.
    """

    def __init__(self, registry: str, name: str, device: str, seed: int, warmup: int) -> None:
        import torch

        self.torch = torch
        self.registry = importlib.import_module(registry)
        self.name, self.seed, self.warmup = name, seed, warmup
        self.device = torch.device(device)
        self.tracker = make_tracker(self.device)
        self.warmed: set[tuple] = set()
        self.step: Callable[[], Any] | None = None
        self.grads: list[Any] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def clear(self) -> None:
        for tensor in self.grads:
            tensor.grad = None
        gc.collect()

    def setup(self, cell: dict[str, Any]) -> dict[str, Any]:
        try:
            built = self.registry.build_cell(self.name, cell, self.device, self.seed)
        except Unavailable as reason:
            return {"status": "unavailable", "reason": str(reason)}
        self.step, self.grads, signature = built.step, built.grads, built.signature
        warmed_up = signature not in self.warmed
        if warmed_up:
            for _ in range(self.warmup):
                self.clear()
                self.step()
            self.sync()
            self.warmed.add(signature)
        return {
            "status": "ok",
            "grad_bytes": sum(t.numel() * t.element_size() for t in self.grads),
            "warmed_up": warmed_up,  # for the parent's progress report
        }

    def run(self) -> dict[str, Any]:
        self.clear()
        baseline = self.tracker.start()
        start = time.perf_counter()
        loss = self.step()
        self.sync()
        elapsed = time.perf_counter() - start
        peak = self.tracker.peak() - baseline
        value = float(loss)
        if not math.isfinite(value):
            return {"status": "error", "reason": f"non-finite loss {value}"}
        return {
            "status": "ok",
            "time_s": elapsed,
            "peak_bytes": peak,
            "baseline_bytes": baseline,
            "loss": value,
        }

    def teardown(self) -> dict[str, Any]:
        self.step, self.grads = None, []
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
        return {"status": "ok"}


def child_main() -> None:
    """Serve commands (JSON lines on stdin): ``setup``, ``run``, ``teardown``; reply one tagged
    JSON line each. The first line configures the child (peer, device, threads, limits)."""
    config = json.loads(sys.stdin.readline())
    if config.get("mem_limit_bytes"):
        limit = int(config["mem_limit_bytes"])
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import torch

    torch.set_num_threads(config["threads"])
    state = ChildState(
        config["registry"], config["name"], config["device"], config["seed"], config["warmup"]
    )
    for line in sys.stdin:
        command = json.loads(line)
        try:
            reply = getattr(state, command["op"])(*command.get("args", ()))
        except Exception as error:  # a failing peer is a table cell, never a crash
            state.teardown()
            reply = {
                "status": "OOM" if is_oom(error) else "error",
                "reason": f"{type(error).__name__}: {str(error)[:400]}",
            }
        print(_TAG + json.dumps(reply), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent side.


class Worker:
    """The parent's handle on one implementation's child; respawned after the child dies."""

    def __init__(self, name: str, config: dict[str, Any], timeout_s: float) -> None:
        self.config, self.timeout_s = config | {"name": name}, timeout_s
        self.child: subprocess.Popen | None = None
        self.stderr: IO[str] | None = None
        self.lines: queue.Queue = queue.Queue()

    def _spawn(self) -> None:
        threads = str(self.config["threads"])
        env = os.environ | {
            "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])
            ),
        }
        self.stderr = tempfile.TemporaryFile("w+")
        self.child = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )
        self.lines = queue.Queue()
        threading.Thread(
            target=self._read, args=(self.child.stdout, self.lines), daemon=True
        ).start()
        self._send(self.config)

    @staticmethod
    def _read(stream: IO[str], lines: queue.Queue) -> None:
        for line in stream:
            if line.startswith(_TAG):
                lines.put(json.loads(line[len(_TAG) :]))
        lines.put(None)

    def _send(self, message: dict[str, Any]) -> None:
        assert self.child is not None and self.child.stdin is not None
        self.child.stdin.write(json.dumps(message) + "\n")
        self.child.stdin.flush()

    def call(self, op: str, *args: Any) -> dict[str, Any]:
        """Send one command and wait for its reply; a dead or hung child becomes a failed reply."""
        if self.child is None:
            self._spawn()
        try:
            self._send({"op": op, "args": args})
            reply = self.lines.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close(kill=True)
            return {"status": "timeout", "reason": f"no reply within {self.timeout_s:.0f} s"}
        except BrokenPipeError:
            reply = None
        if reply is not None:
            return reply
        code = self.child.wait()
        self.stderr.seek(0)
        tail = self.stderr.read()[-600:].strip()
        self.close()
        if code == -9:
            return {
                "status": "OOM",
                "reason": "killed by SIGKILL (most likely the kernel's out-of-memory killer)",
            }
        return {"status": "error", "reason": f"child exited with {code}: {tail}"}

    def close(self, kill: bool = False) -> None:
        """End the child: closing its stdin ends its command loop; a hung child is killed."""
        if self.child is not None:
            if kill:
                self.child.kill()
            try:
                self.child.stdin.close()
                self.child.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.child.kill()
                self.child.wait()
            self.child = None
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None


def run_grid(
    registry: str,
    peers: list[str],
    cells: list[dict[str, Any]],
    *,
    device: str,
    threads: int,
    warmup: int,
    repeats: int,
    time_budget_s: float,
    mem_limit_bytes: int | None,
    timeout_s: float,
    seed: int = 0,
    on_result: Callable[[int, str, CellResult], None] | None = None,
    on_setup: Callable[[int, str, dict[str, Any] | None], None] | None = None,
) -> dict[tuple[int, str], CellResult]:
    """Measure every implementation in ``peers`` of ``registry`` on every cell (JSON-able dicts
    with the sizes :func:`dominates` reads), side by side; results by (cell index, name).

    ``on_result(index, name, result)`` is called when a cell is done; ``on_setup(index, name,
    reply)`` before each setup (``reply`` None) and after it (the child's reply, whose
    ``warmed_up`` says whether the untimed warm-up ran), so that a progress report can show the
    start-up and warm-up, which take most of the first minute, as steps of their own.
    """
    config = {
        "registry": registry,
        "device": device,
        "threads": threads,
        "warmup": warmup,
        "mem_limit_bytes": mem_limit_bytes,
        "seed": seed,
    }
    workers = {p: Worker(p, config, timeout_s) for p in peers}
    results: dict[tuple[int, str], CellResult] = {}
    out_of_memory: dict[str, list[dict[str, Any]]] = {p: [] for p in peers}

    def finish(index: int, peer: str, result: CellResult) -> None:
        results[index, peer] = result
        if result.status == "OOM":
            out_of_memory[peer].append(cells[index])
        if on_result is not None:
            on_result(index, peer, result)

    try:
        for index, cell in enumerate(cells):
            active: list[str] = []
            grad_bytes: dict[str, int] = {}
            for peer in peers:
                if any(dominates(cell, small) for small in out_of_memory[peer]):
                    finish(
                        index,
                        peer,
                        CellResult("OOM", reason="skipped: out of memory at a smaller shape"),
                    )
                    continue
                if on_setup is not None:
                    on_setup(index, peer, None)
                reply = workers[peer].call("setup", cell)
                if on_setup is not None:
                    on_setup(index, peer, reply)
                if reply["status"] == "ok":
                    active.append(peer)
                    grad_bytes[peer] = reply["grad_bytes"]
                else:
                    finish(index, peer, CellResult(reply["status"], reason=reply.get("reason")))
            partial = {p: CellResult("ok", grad_bytes=grad_bytes[p]) for p in active}
            peaks: dict[str, list[int]] = {p: [] for p in active}
            for round_ in range(repeats):
                shift = round_ % len(active) if active else 0
                for peer in active[shift:] + active[:shift]:
                    if peer not in partial or sum(partial[peer].times_s) >= time_budget_s:
                        continue
                    reply = workers[peer].call("run")
                    if reply["status"] != "ok":
                        del partial[peer]
                        finish(index, peer, CellResult(reply["status"], reason=reply.get("reason")))
                        continue
                    result = partial[peer]
                    result.times_s.append(reply["time_s"])
                    peaks[peer].append(reply["peak_bytes"])
                    result.baseline_bytes, result.loss = reply["baseline_bytes"], reply["loss"]
            for peer, result in partial.items():
                result.peak_bytes, result.peaks_bytes = max(peaks[peer]), peaks[peer]
                workers[peer].call("teardown")
                finish(index, peer, result)
    finally:
        for worker in workers.values():
            worker.close()
    return results


if __name__ == "__main__":
    # Through the module, not __main__: the registries import harness, and its classes
    # (Unavailable, Cell) must be the same objects here and there.
    import harness

    harness.child_main()
