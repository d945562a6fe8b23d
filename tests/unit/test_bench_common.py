"""bench/common.py's shared helpers: tables, missing cells, the log-interpolated best-of-n curve
and the bounded request loop (the benchmarks themselves need an engine and are not tests)."""

import asyncio
import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "common.py"
_spec = importlib.util.spec_from_file_location("bench_common", _PATH)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_markdown_table_and_missing_cells():
    lines = common.markdown_table(["a", "b"], [[1, common.fmt(None)], ["x", common.fmt(0.5, ".2f")]])
    assert lines == ["| a | b |", "|---|---|", "| 1 | – |", "| x | 0.50 |"]
    assert common.fmt(math.nan, ".1f") == "–" and common.fmt(3, "d") == "3"


def test_log_interpolate_reads_the_curve_between_points_and_bounds_beyond_it():
    curve = [(10.0, 0.5), (40.0, 0.7), (160.0, 0.8)]
    cost, exact = common.log_interpolate(0.6, curve)
    assert exact and cost == pytest.approx(20.0)  # halfway in log(cost): √(10·40)
    assert common.log_interpolate(0.4, curve) == (10.0, True)  # below: the cheapest point
    assert common.log_interpolate(0.9, curve) == (160.0, False)  # beyond: a lower bound


def test_gather_bounded_keeps_order_and_the_bound():
    running, peak = 0, 0

    async def work(i):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        running -= 1
        return i * i

    assert asyncio.run(common.gather_bounded(work, range(10), 3)) == [i * i for i in range(10)]
    assert peak == 3


def test_mixed_prompts_alternate_kinds(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(f'{{"prompt": "{k}{i}", "kind": "{k}"}}\n'
                         for k in ("helpful", "adversarial") for i in range(3)))
    assert common.load_prompts(f, 4, mixed=True) == ["helpful0", "adversarial0", "helpful1",
                                                       "adversarial1"]
    assert common.load_prompts(f, None) == [f"helpful{i}" for i in range(3)] + [
        f"adversarial{i}" for i in range(3)]


def test_load_range_spans_every_rows_start_and_end():
    load_range = common.load_range
    rows = [{"load_avg": [1.26, 2.0]}, {"load_avg": [3.04, 0.9]}]
    assert load_range(rows) == "0.9–3.0"
    assert load_range(rows, ".0f") == "1–3"
    assert "–" in load_range([])  # no row yet: the machine's load now
