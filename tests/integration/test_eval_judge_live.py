"""`alignserve eval --judge` on the real engine: three dev prompts, best-of-n at n ∈ {1, 4}
selecting by relevance over HTTP against the session's server, judged in this process by
sentiment and by −profanity (the real scorers, which no strategy optimised)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.cli import main
from evaluation.judge import PLOT

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def three_prompts(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in
            (ROOT / "bench" / "prompts-dev.jsonl").read_text().splitlines()]
    pick = [r for r in rows if r["kind"] == "helpful"][:2] + [
        next(r for r in rows if r["kind"] == "adversarial")]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pick))
    return path


def test_eval_with_judges_over_http(server, tmp_path, capsys):
    prompts = three_prompts(tmp_path)
    # the proxy as judge is refused by name, before any request
    rc = main(["--server", server.base_url, "--prompts", str(prompts), "--reward", "relevance",
               "--judge", "relevance", "--out", str(tmp_path / "refused")])
    assert rc == 2 and "--judge 'relevance' is the --reward scorer" in capsys.readouterr().err
    out = tmp_path / "eval"
    rc = main(["--server", server.base_url, "--prompts", str(prompts),
               "--strategies", "none,best_of_n", "--n", "1,4", "--max-tokens", "16",
               "--reward", "relevance", "--judge", "sentiment", "--judge=-profanity",
               "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["judges"] == ["sentiment", "-profanity"]
    assert [e["label"] for e in doc["strategies"]] == ["none", "best_of_n n=1", "best_of_n n=4"]
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    for e in doc["strategies"]:
        for a in e["answers"]:
            # the judge scored the very answer the server returned, in this process
            assert a["judges"]["sentiment"] == pytest.approx(
                vader.polarity_scores(a["answer"])["compound"])
            assert -1.0 <= a["judges"]["-profanity"] <= 0.0
        for label, j in e["judges"].items():
            lo, hi = j["mean_ci"]
            assert lo - 1e-9 <= j["mean"] <= hi + 1e-9, label
            assert 0.0 <= j["win_rate"] <= 1.0
    assert doc["strategies"][2]["mean_kl_bound"] > 0  # the figure's x: KL bound of best-of-4
    report = (out / "report.md").read_text()
    assert "## Proxy vs judges" in report and "judge `-profanity` mean" in report
    assert (out / PLOT).stat().st_size > 5000
