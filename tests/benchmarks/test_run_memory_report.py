"""The front-door benchmark's report conventions, checked on made-up results (no benchmark runs):
one ratio direction (value / best, lower is better) in the tables and the summary, no ratio on a
figure under the memory noise floor, the preset actually run in the header, every plot mark
explained in its legend, and every file written listed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# benchmarks/ goes on the path only for these imports (its modules import each other by name).
sys.path.insert(0, str(BENCHMARKS))
try:
    import run_memory as rm
    from harness import CellResult
    from peers import Workload
finally:
    sys.path.remove(str(BENCHMARKS))

MIB = 1 << 20
RATIO = re.compile(r"\(([\d.]+)x\)")


def _cells() -> list[Workload]:
    return [
        Workload("solopo", 4096, 1024, 256, 512, 8192, 1, "dpo", "float32"),
        Workload("dpo-long", 4096, 1024, 256, 512, 8192, 1, "dpo", "float32"),
    ]


def _result(peak_mib: float, grad_mib: float, seconds: float) -> CellResult:
    peak = int(peak_mib * MIB)
    return CellResult(
        "ok",
        peak_bytes=peak,
        peaks_bytes=[peak, peak - 4096],
        grad_bytes=int(grad_mib * MIB),
        times_s=[seconds],
        loss=0.5,
    )


def _results() -> dict[tuple[int, str], CellResult]:
    """Row 0: ours best in memory, CCE best in time, Liger partial. Row 1: extra memory at the
    noise level for ours and CCE (0.8 and 0.9 MiB above the gradients), 3 GiB for plain."""
    return {
        (0, "plain"): _result(2160, 30, 4.0),
        (0, "liger"): _result(261, 30, 0.44),
        (0, "cce"): _result(82, 30, 0.143),
        (0, "ours"): _result(55, 30, 0.184),
        (1, "plain"): _result(3120, 81, 6.9),
        (1, "liger"): _result(3200, 81, 5.6),
        (1, "cce"): _result(81.9, 81, 0.102),
        (1, "ours"): _result(81.8, 81, 0.129),
    }


PEER_ORDER = ["plain", "liger", "cce", "ours"]


def _rows(table: str) -> list[list[str]]:
    return [line.split(" | ")[1:] for line in table.splitlines()[2:]]


def test_ratio_is_value_over_best_and_lower_is_better():
    assert rm.format_figure(2 * MIB * 10, 10 * MIB, rm._fmt_mem) == "20 MiB (2.00x)"
    assert rm.format_figure(10 * MIB, 10 * MIB, rm._fmt_mem) == "**10 MiB (1.00x)**"
    # A peer that does less work: its ratio to the full-work best, marked, never bold.
    assert rm.format_figure(5 * MIB, 10 * MIB, rm._fmt_mem, less_work=True) == "5.0 MiB (0.50x) †"
    assert "lower is better" in rm.RATIO_CONVENTION.lower()
    assert "value / best" in rm.RATIO_CONVENTION


@pytest.mark.parametrize("metric", ["peak", "extra", "time"])
def test_table_ratios_match_value_over_best_of_the_row(metric):
    cells, results = _cells(), _results()
    floor = rm.noise_floor_bytes("cpu", rm.peak_spread_bytes(results))
    read, _, noisy = rm.METRICS[metric]
    for index, row in enumerate(_rows(rm.table(cells, PEER_ORDER, results, metric, floor))):
        values = {p: read(results[index, p]) for p in PEER_ORDER}
        best = min(v for p, v in values.items() if not rm.partial(p, cells[index]))
        for peer, text in zip(PEER_ORDER, row):
            match = RATIO.search(text)
            if match is None:
                continue
            assert float(match.group(1)) == pytest.approx(values[peer] / best, rel=0.01, abs=0.01)
            if not rm.partial(peer, cells[index]):
                assert float(match.group(1)) >= 1.0, text  # nothing full-work beats the best


def test_no_ratio_on_a_noise_level_figure():
    cells, results = _cells(), _results()
    floor = rm.noise_floor_bytes("cpu", rm.peak_spread_bytes(results))
    assert floor == rm.NOISE_MIN_BYTES  # the made-up spread (one page) is under the minimum
    extra = _rows(rm.table(cells, PEER_ORDER, results, "extra", floor))
    dpo_long = dict(zip(PEER_ORDER, extra[1]))
    for peer in ("cce", "ours"):  # 0.9 and 0.8 MiB above the gradients
        assert "noise" in dpo_long[peer] and "x)" not in dpo_long[peer]
    # Plain's 3 GiB is a real figure, but its row's best is noise: no ratio (it would divide by it).
    assert "GiB" in dpo_long["plain"] and "x)" not in dpo_long["plain"]
    # The row above the floor keeps its ratios.
    assert all(RATIO.search(text) for text in extra[0])
    # The same rule in the formatter, and on CUDA the floor is the allocator's 512-byte blocks.
    assert rm.format_figure(0.5 * MIB, 0.5 * MIB, rm._fmt_mem, floor=MIB) == "< 1.0 MiB (noise)"
    assert rm.noise_floor_bytes("cuda", 0) == 512
    assert rm.noise_floor_bytes("cpu", 3 * MIB) == 3 * MIB  # a measured spread above the minimum


def test_reading_notes_define_the_floor_and_the_convention_once():
    notes = "\n".join(rm.reading_notes("cpu", MIB, 100 * 1024))
    assert rm.RATIO_CONVENTION in notes and "1.0 MiB" in notes and "spread" in notes
    assert "†" in notes


def test_summary_uses_the_tables_direction_and_names_the_best():
    lines = rm.summary(_cells(), PEER_ORDER, _results(), rm.NOISE_MIN_BYTES)
    assert len(lines) == 2
    solopo = lines[0]
    # Ours: best memory; time 0.184 / 0.143 = 1.29x the best (CCE). The opposite direction
    # (best / ours = 0.78x) must not appear.
    assert "peak memory 55 MiB (1.00x, the best)" in solopo
    assert "time 184 ms (1.29x, the best: CCE, 143 ms)" in solopo
    assert "0.78x" not in solopo and "peer / solopo" not in solopo
    assert all(float(r) >= 1.0 for line in lines for r in RATIO.findall(line))


def test_header_names_the_preset_actually_run():
    default = rm.parse_args(["--device", "cpu"])
    assert "quick preset (the default)" in rm.header(default)
    assert "--quick" not in rm.header(default)
    assert "(--quick)" in rm.header(rm.parse_args(["--device", "cpu", "--quick"]))
    full = rm.header(rm.parse_args(["--device", "cpu", "--full", "--long", "2048"]))
    assert "full preset (--full) with --long from the command line" in full
    custom = rm.parse_args(["--device", "cpu", "--hidden", "64", "--time-budget", "1"])
    assert rm.preset_label(custom.preset, custom.preset_flag, custom.overrides) == (
        "quick preset (the default) with --hidden, --time-budget from the command line"
    )


def test_plots_set_our_lines_apart_and_explain_every_mark():
    ours, peer = rm.line_style("ours"), rm.line_style("cce")
    assert ours["linestyle"] == "-" and peer["linestyle"] == "--"
    for name in rm.PEERS:
        style = rm.line_style(name)
        if name not in rm.OURS:
            assert style["linewidth"] < ours["linewidth"] and style["zorder"] < ours["zorder"]
    assert rm.line_style("ours-strict") == ours
    solopo = [c for c in _cells() if c.kind == "solopo"]
    notes = rm.legend_notes(solopo, PEER_ORDER, grouped=True)
    assert any(n.startswith("† Liger") for n in notes)  # Liger is marked † in solopo rows
    assert any("solid" in n and "dashed" in n for n in notes)
    assert any("response length" in n for n in notes)
    dpo_long = [c for c in _cells() if c.kind == "dpo-long"]
    assert not any("†" in n for n in rm.legend_notes(dpo_long, PEER_ORDER, grouped=False))


def test_every_file_written_is_listed_with_what_it_shows(tmp_path):
    cells = [
        Workload(kind, length, 1024, 256, 512, 8192, 1, "dpo", "float32")
        for kind in ("solopo", "dpo-long")
        for length in (4096, 8192)
    ]
    files = rm.output_files(cells, tmp_path, tmp_path / "run_memory.json", tmp_path)
    names = [path.name for path, _ in files]
    assert names == [
        "run_memory.md",
        "run_memory.json",
        "memory_solopo.png",
        "time_solopo.png",
        "memory_dpo-long.png",
        "time_dpo-long.png",
    ]
    lines = rm.files_section(files)
    assert lines[0] == "Files written:" and len(lines) == len(files) + 1
    assert all(": " in line and len(line.split(": ", 1)[1]) > 20 for line in lines[1:])
    assert [n for _, _, n in rm.plot_specs(cells)] == names[2:]
    no_plots = rm.output_files(cells, tmp_path, tmp_path / "run_memory.json", None)
    assert len(no_plots) == 2


def test_progress_restarts_its_estimate_after_the_warm_up():
    cells, peers = _cells(), ["cce", "ours"]
    progress = rm.Progress(cells, peers)
    try:
        assert progress.bar.total == len(peers) and progress.bar.desc.startswith("start")
        for peer in peers:
            progress.on_setup(0, peer, None)
            progress.on_setup(0, peer, {"status": "ok", "warmed_up": True})
        # After every peer's start-up and warm-up: a fresh bar over the measured cells.
        assert progress.bar.desc.startswith("measuring")
        assert (progress.bar.n, progress.bar.total) == (0, len(cells) * len(peers))
        progress.on_result(0, "cce", _result(82, 30, 0.1))
        assert progress.bar.n == 1
    finally:
        progress.close()


def test_the_front_door_leaves_out_the_all_saved_mode():
    # At the front door's shapes every logit fits the default budget: "ours-all" would repeat it.
    peers = rm.parse_args([]).peers
    assert "ours" in peers and "ours-strict" in peers and "ours-all" not in peers
    assert rm.parse_args(["--peers", "ours,ours-all"]).peers == ["ours", "ours-all"]


def test_cells_that_did_not_run_are_listed_with_their_reason():
    cells = _cells()
    results = {(0, "ours"): _result(10, 1, 0.1), (1, "cce"): CellResult("OOM", reason="killed")}
    lines = rm.failures_section(cells, results)
    assert lines[:2] == ["", "Cells that did not run:"] and len(lines) == 3
    assert "CCE: OOM: killed" in lines[2] and cells[1].label() in lines[2]
    assert rm.failures_section(cells, {(0, "ours"): _result(10, 1, 0.1)}) == []
