"""The grid: which units run, in which order, in a pool of worker processes, and the choice of
each arm's hyperparameters on the dev set.

Phase 1 (dev), in two stages, with the first seed, evaluated on the dev questions:

1. the starting model, and X and X expand-long with every setting of ``preset.sweep``; each arm
   takes the setting with the best mean dev accuracy (short prompt and every long length
   weighted alike; ties go to the first setting);
2. SoLo-X and SoLo-X RA-long with X's chosen setting and every alpha of ``preset.alphas``; each
   takes its best alpha by the same rule.

The test set plays no part in the choice.

Phase 2 (test): the starting model, and every arm with its chosen setting and every seed,
evaluated on the test questions. The first seed's weights are the ones phase 1 trained (same
arm, setting and seed: the same run), so they are reused, not retrained.

A unit whose result file exists is skipped: rerun the same command to continue an interrupted
grid, or give ``max_minutes`` to stop submitting units after a while and run the grid in pieces.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .config import LOSS_TYPES, SOLO_VARIANTS, VARIANTS, Preset
from .pipeline import Workspace, write_json
from .training import Unit, init_worker, run_unit_in_worker

# Memory freed by one unit goes back to the system before the next one (see training.py).
MMAP_THRESHOLD = str(128 * 1024)


def sweep_units(preset: Preset) -> list[Unit]:
    """Stage 1: the starting model, then X and X expand-long with the first setting, then with
    the second, ..."""
    units = [Unit("base", "base", 0, "dev")]
    for index in range(max(len(settings) for settings in preset.sweep.values())):
        for loss_type in LOSS_TYPES:
            if index >= len(preset.sweep[loss_type]):
                continue
            hparams = dict(preset.sweep[loss_type][index])
            for variant in VARIANTS:
                if variant not in SOLO_VARIANTS:
                    units.append(Unit(loss_type, variant, preset.seeds[0], "dev", hparams))
    return units


def alpha_units(preset: Preset, chosen: dict[str, dict[str, float]]) -> list[Unit]:
    """Stage 2: the SoLo arms with X's chosen setting (``chosen`` by arm name) and every alpha."""
    units = []
    for alpha in preset.alphas:
        for loss_type in LOSS_TYPES:
            setting = chosen[Unit(loss_type, "short", 0, "dev").arm]
            for variant in SOLO_VARIANTS:
                hparams = {**setting, "alpha": alpha}
                units.append(Unit(loss_type, variant, preset.seeds[0], "dev", hparams))
    return units


def grid_units(preset: Preset, selection: dict[str, dict[str, float]]) -> list[Unit]:
    units = [Unit("base", "base", 0, "test")]
    for seed in preset.seeds:
        for loss_type in LOSS_TYPES:
            for variant in VARIANTS:
                unit = Unit(loss_type, variant, seed, "test")
                units.append(Unit(loss_type, variant, seed, "test", selection[unit.arm]))
    return units


def load_result(work: Workspace, unit: Unit, preset: Preset) -> dict[str, Any] | None:
    """The unit's result, or None when it has none, or one from other data or another starting
    model (another preset fingerprint: it is redone)."""
    path = work.unit_result(unit.split, unit.model_key)
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("fingerprint") == preset.fingerprint() else None


def select(
    preset: Preset, work: Workspace, units: list[Unit], choices: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Each arm of ``units`` (dev results) gets its setting with the best mean dev accuracy;
    added to ``choices`` and written to ``selection.json``."""
    choices = dict(choices or {})
    for unit in units:
        if unit.variant == "base":
            continue
        result = load_result(work, unit, preset)
        if result is None:
            raise RuntimeError(f"dev result of {unit.model_key} is missing; run phase 1 first")
        # Rounded so that float noise does not break ties (ties go to the first setting).
        score = round(statistics.fmean(result["accuracy"].values()), 9)
        tried = choices.setdefault(unit.arm, {"tried": []})["tried"]
        tried.append({"hparams": unit.hparams, "dev_mean_accuracy": score})
    for choice in choices.values():
        best = max(choice["tried"], key=lambda item: item["dev_mean_accuracy"])  # first on ties
        choice["hparams"] = best["hparams"]
    write_json(work.results / "selection.json", choices)
    return choices


def run_units(
    units: list[Unit],
    preset: Preset,
    work: Workspace,
    pool: ProcessPoolExecutor,
    *,
    jobs: int,
    deadline: float | None,
    desc: str,
    worker: Callable[..., dict[str, Any]] = run_unit_in_worker,
) -> bool:
    """Run the units without a result file, ``jobs`` at a time in ``pool``; True when all are
    done. No unit is started after ``deadline`` (a ``time.monotonic()`` value); the running ones
    finish. ``worker(unit, preset, work_root, results)`` runs one unit in a pool process and
    returns its result (``accuracy`` by column, ``unit`` with ``arm`` and ``seed``)."""
    todo = [unit for unit in units if load_result(work, unit, preset) is None]
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=desc, unit="unit")
    pending: set = set()
    while todo or pending:
        while todo and len(pending) < jobs and (deadline is None or time.monotonic() < deadline):
            unit = todo.pop(0)
            pending.add(pool.submit(worker, unit, preset, str(work.root), str(work.results)))
        if not pending:
            break
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            result = future.result()
            scores = " ".join(f"{k} {v:.2f}" for k, v in result["accuracy"].items())
            bar.set_postfix_str(f"{result['unit']['arm']} seed {result['unit']['seed']}: {scores}")
            bar.update()
    bar.close()
    return all(load_result(work, unit, preset) is not None for unit in units)


def run_grid(
    preset: Preset, work: Workspace, *, jobs: int, threads: int, max_minutes: float | None
) -> bool:
    """Phase 1, the choice, phase 2; True when every unit of both phases has its result."""
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # inherited by the workers
    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(threads,),
    ) as pool:
        options = {"jobs": jobs, "deadline": deadline}
        stage1 = sweep_units(preset)
        if not run_units(stage1, preset, work, pool, desc="dev sweep", **options):
            return False
        selection = select(preset, work, stage1)
        chosen = {arm: choice["hparams"] for arm, choice in selection.items()}
        stage2 = alpha_units(preset, chosen)
        if not run_units(stage2, preset, work, pool, desc="dev alpha sweep", **options):
            return False
        selection = select(preset, work, stage2, selection)
        chosen = {arm: choice["hparams"] for arm, choice in selection.items()}
        units = grid_units(preset, chosen)
        return run_units(units, preset, work, pool, desc="test grid", **options)


def results_of(work: Workspace, split: str, preset: Preset) -> list[dict[str, Any]]:
    """Every unit result of ``split`` for ``preset``'s data and starting model (sorted by file
    name; files left by another fingerprint are ignored)."""
    folder = Path(work.results) / "units" / split
    results = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    return [r for r in results if r.get("fingerprint") == preset.fingerprint()]
