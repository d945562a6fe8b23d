"""Particle filtering (Puri et al. 2025) on the real engine through the API, streamed and not,
guided by the `relevance` text scorer on partial answers; and `alignserve eval --panel` over
HTTP against the session's server, particle filtering among the strategies measured."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cli.main import main

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ASK = [{"role": "user", "content": "Give me three tips for sleeping better."}]
K, BLOCK, MAX = 4, 8, 24
ALIGN = {"strategy": "particle_filtering", "n": K, "block_tokens": BLOCK, "value": "relevance",
         "ess_threshold": 1.0, "resampling_temperature": 0.02, "return_candidates": True}


def particles(client, model_name, **kw):
    return client.chat.completions.create(
        model=model_name, messages=ASK, max_tokens=MAX, temperature=1.0, seed=5,
        extra_body={"alignment": ALIGN}, **kw)


def check(a: dict, text: str) -> None:
    assert a["strategy"] == "particle_filtering" and a["value"] == "relevance"
    assert a["resampling"] == "systematic" and len(a["ess"]) == a["blocks"] >= 2
    assert all(1.0 - 1e-6 <= e <= K + 1e-6 for e in a["ess"])
    # resampled exactly after the blocks whose ESS fell below the threshold (1.0·K), never
    # after the last one
    assert a["resampled_after_blocks"] == [b for b, e in enumerate(a["ess"], 1)
                                           if e < K and b < a["blocks"]]
    assert a["kl_bound"] == pytest.approx(math.ceil(MAX / BLOCK) * math.log(K))
    assert a["kl_estimate"] is None and a["win_rate_bound"] is None
    assert sum(a["final_weights"]) == pytest.approx(1, abs=1e-4)
    assert a["scored_candidates"] == K * a["blocks"]
    assert -1.0 <= a["reward"] <= 1.0  # relevance of the final answer
    assert len(a["candidates"]) == K
    assert text == a["candidates"][a["chosen_index"]]["text"]


def test_particle_filtering_over_http(client, model_name):
    r = particles(client, model_name)
    a = r.model_extra["alignment"]
    assert r.choices[0].message.content.strip()
    check(a, r.choices[0].message.content)
    # with a low temperature relevance separates particles: some block resampled
    assert a["resampled_after_blocks"]


def test_particle_filtering_streams_the_same_answer(client, model_name):
    plain = particles(client, model_name)
    chunks = list(particles(client, model_name, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    a = finals[-1].model_extra["alignment"]
    check(a, text)
    assert text == plain.choices[0].message.content  # seeded: the same answer, streamed
    assert a["ess"] == plain.model_extra["alignment"]["ess"]


def test_eval_panel_over_http(server, tmp_path):
    rows = [json.loads(line) for line in
            (ROOT / "bench" / "prompts-dev.jsonl").read_text().splitlines()][:2]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    rc = main(["eval", "--server", server.base_url, "--prompts", str(prompts),
               "--strategies", "none,best_of_n,particle_filtering", "--n", "3",
               "--max-tokens", "12", "--reward", "relevance", "--panel",
               "relevance,-profanity", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["panel"] == ["relevance", "-profanity"]
    by = {e["strategy"]: e for e in doc["strategies"]}
    assert by["none"]["distortion"] == 1.0
    for name in ("best_of_n", "particle_filtering"):
        d, (lo, hi) = by[name]["distortion"], by[name]["distortion_ci"]
        assert 1.0 <= lo <= d <= hi
        assert all(0 <= a["panel_achieved"] <= a["panel_best"] <= 1 for a in by[name]["answers"])
    assert "distortion (panel)" in (out / "report.md").read_text()
