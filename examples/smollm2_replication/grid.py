"""The grid: which units run, in which order, in a pool of worker processes, and the choice of
each arm's settings on the dev set (the earlier experiment's rules, :mod:`replication.grid`).

Phase 0: the starting model on the dev and the test questions (evaluations only, no training:
a grid stopped early has the reference curve of every comparison).

Phase 1 (dev), with the first seed, evaluated on the dev questions (short prompt and every dev
length):

1. the starting model, SimPO with every learning rate of the preset, then SimPO expand-long
   with every rate (the cheap units first: a grid stopped early has SimPO's rate, which the SoLo
   arms need); each takes the rate with the best mean dev accuracy (the short prompt and every
   dev length weighted alike; ties go to the first);
2. SoLo-SimPO and SoLo-SimPO RA-long with SimPO's rate and every alpha; each takes its best
   alpha by the same rule.

Phase 2 (test): the starting model, and every arm with its chosen setting and every seed,
evaluated on the test questions. The first seed's adapters are phase 1's (same arm, setting and
seed: the same run), reused, not retrained.

A unit whose result file exists is skipped: rerun the same command to continue, or give
``max_minutes`` to stop submitting units after a while and run the grid in pieces.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

from replication.grid import MMAP_THRESHOLD, run_units, select
from replication.training import Unit

from .config import SOLO_VARIANTS, VARIANTS, Preset
from .pipeline import Workspace
from .training import init_worker, run_unit_in_worker, unit


def base_units() -> list[Unit]:
    """Phase 0: the starting model on dev and on test (phases 1 and 2 find them done)."""
    return [unit("base", 0, "dev"), unit("base", 0, "test")]


def sweep_units(preset: Preset) -> list[Unit]:
    """Stage 1: the starting model, SimPO at each learning rate, then SimPO expand-long at each
    (SimPO's units first: they are the cheap ones, and the SoLo arms take SimPO's rate)."""
    units = [unit("base", 0, "dev")]
    for variant in ("short", "expand-long"):
        units += [unit(variant, preset.seeds[0], "dev", {"lr": lr}) for lr in preset.learning_rates]
    return units


def alpha_units(preset: Preset, chosen: dict[str, dict[str, float]]) -> list[Unit]:
    """Stage 2: the SoLo arms with SimPO's chosen setting (``chosen`` by arm) and every alpha."""
    setting = chosen[unit("short", 0, "dev").arm]
    return [
        unit(variant, preset.seeds[0], "dev", {**setting, "alpha": alpha})
        for alpha in preset.alphas
        for variant in SOLO_VARIANTS
    ]


def grid_units(preset: Preset, chosen: dict[str, dict[str, float]]) -> list[Unit]:
    """Phase 2: the starting model, then every arm with every seed (seed by seed, so that a grid
    stopped early has whole seeds)."""
    units = [unit("base", 0, "test")]
    for seed in preset.seeds:
        units += [unit(v, seed, "test", chosen[unit(v, 0, "test").arm]) for v in VARIANTS]
    return units


def run_grid(
    preset: Preset,
    work: Workspace,
    *,
    jobs: int,
    threads: int,
    max_minutes: float | None,
    vllm_python: str | None = None,
) -> bool:
    """Phase 0, phase 1, the choices, phase 2; True when every unit has its result."""
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # inherited by the workers
    worker = functools.partial(run_unit_in_worker, vllm_python=vllm_python)
    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(threads,),
    ) as pool:
        options = {"jobs": jobs, "deadline": deadline, "worker": worker}
        if not run_units(base_units(), preset, work, pool, desc="starting model", **options):
            return False
        stage1 = sweep_units(preset)
        if not run_units(stage1, preset, work, pool, desc="dev: learning rate", **options):
            return False
        selection = select(preset, work, stage1)
        chosen = {arm: choice["hparams"] for arm, choice in selection.items()}
        stage2 = alpha_units(preset, chosen)
        if not run_units(stage2, preset, work, pool, desc="dev: alpha", **options):
            return False
        selection = select(preset, work, stage2, selection)
        chosen = {arm: choice["hparams"] for arm, choice in selection.items()}
        units = grid_units(preset, chosen)
        return run_units(units, preset, work, pool, desc="test", **options)
