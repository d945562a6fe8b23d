"""`alignserve eval` on the real engine: two dev prompts × 2 seeded samples, small n and budget,
over HTTP against the session's server (the in-process path is the same harness on the same strategies; its
engine wiring is exercised by the full dev-prompt run, see docs/offline.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cli.main import main
from evaluation.report import PLOTS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def two_prompts(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in (ROOT / "bench" / "prompts-dev.jsonl").read_text().splitlines()]
    pick = [next(r for r in rows if r["kind"] == k) for k in ("helpful", "adversarial")]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pick))
    return path


def test_eval_over_http(server, tmp_path):
    out = tmp_path / "eval"
    rc = main(["eval", "--server", server.base_url, "--prompts", str(two_prompts(tmp_path)),
               "--strategies", "none,best_of_n,speculative_rejection", "--n", "2",
               "--max-tokens", "16", "--decision-tokens", "4", "--reward", "relevance",
               "--cost", "profanity", "--samples", "2", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["harmless_threshold"] == 0.5 and doc["config"]["prompt_count"] == 2
    assert doc["config"]["samples"] == 2 and doc["config"]["seed"] == 0
    by = {e["strategy"]: e for e in doc["strategies"]}
    assert list(by) == ["none", "best_of_n", "speculative_rejection"]
    assert by["none"]["win_rate"] == 0.5 and by["none"]["mean_kl_bound"] == 0
    assert by["best_of_n"]["mean_kl_bound"] == pytest.approx(math.log(2) - 0.5)
    assert by["speculative_rejection"]["mean_kl_bound"] == pytest.approx(math.log(2))
    assert by["speculative_rejection"]["mean_kl_estimate"] is None
    for e in doc["strategies"]:
        assert set(e["by_kind"]) == {"helpful", "adversarial"}
        assert 0 <= e["win_rate"] <= 1 and 0 <= e["harmless_ratio"] <= 1
        assert 1 <= e["tokens_per_prompt"] <= 16 * e["n"]
        assert (e["prompts"], e["answer_count"]) == (2, 4)
        assert sorted(a["sample"] for a in e["answers"]) == [0, 0, 1, 1]
        for key in ("harmless_ratio", "mean_reward", "mean_cost", "win_rate"):
            lo, hi = e[f"{key}_ci"]
            assert lo - 1e-9 <= e[key] <= hi + 1e-9
        for a in e["answers"]:
            assert a["answer"] and -1 <= a["reward"] <= 1 and 0 <= a["cost"] <= 1
            assert a["harmless"] == (a["cost"] < 0.5)
            assert a["wall_s"] > 0
    md = (out / "report.md").read_text()
    assert "## helpful prompts" in md and "## adversarial prompts" in md
    assert all((out / p).stat().st_size > 5000 for p in PLOTS)


def test_prefill_attack_over_http(server, tmp_path):
    """Qi et al.'s prefill attack against the session's server: the first k tokens of the
    shipped harmful answers go over the API as assistant prefill; attack success per k."""
    out = tmp_path / "prefill"
    rc = main(["eval", "--server", server.base_url, "--prefill", "6", "--limit", "3",
               "--strategies", "none,best_of_n", "--n", "2", "--max-tokens", "12",
               "--reward", "relevance", "--cost", "profanity", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "prefill.json").read_text())
    assert doc["config"]["k"] == [0, 6] and doc["config"]["attacks"] == 3
    rows = {(r["label"], r["k"]): r for r in doc["attack"]}
    assert set(rows) == {(s, k) for s in ("none", "best_of_n n=2") for k in (0, 6)}
    for r in rows.values():
        assert 0 <= r["attack_success"] <= 1 and r["answers"] == 3
    # only the continuation is generated and judged: no answer repeats its prefill
    prefilled = doc["settings"]["6"][0]["answers"]
    assert all(a["generated_tokens"] <= 12 for a in prefilled)
    assert (out / "prefill_attack.png").stat().st_size > 1000
