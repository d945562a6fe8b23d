"""The controlled-decoding pipeline end to end on the real engine and model:
rollouts (session fixture) → `alignserve train-value` (FUDGE and CD-Q, a few steps) → a server
with both heads → blockwise_cd and tokenwise_cd over HTTP, streamed and not; the heads as
scorers of speculative rejection; and a head keeps working after the policy is hot-swapped
(to a SafeDPO checkpoint made by `alignserve finetune`).
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from live import HEADS_ADMIN_KEY, wait_until

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": f"Bearer {HEADS_ADMIN_KEY}"}
PROMPT = [{"role": "user", "content": "Give me two tips for learning to cook."}]


def test_train_value_reports_its_losses_and_plots(value_heads):
    for method in ("fudge", "cdq"):
        metrics = json.loads((value_heads[method] / "metrics.json").read_text())
        assert math.isfinite(metrics["initial_val_loss"]) and math.isfinite(metrics["val_loss"])
        assert list(value_heads[method].glob("*.png")), "train-value writes its plots"


@pytest.fixture(scope="module")
def cd_server(heads_server):
    return heads_server


def chat(srv, alignment: dict, max_tokens: int = 24, **extra) -> httpx.Response:
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "seed": 7,
            "alignment": alignment, **extra}
    return httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=600)


def stream(srv, alignment: dict, max_tokens: int = 24, **extra) -> tuple[list[str], dict]:
    """The streamed content pieces and the final `alignment` block."""
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
            "alignment": alignment, **extra}
    pieces, info = [], None
    with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", json=body,
                      timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    pieces.append(choice["delta"]["content"])
            info = event.get("alignment") or info
    return pieces, info


BLOCKWISE = {"strategy": "blockwise_cd", "n": 3, "block_tokens": 8, "value": "value:fudge"}
TOKENWISE = {"strategy": "tokenwise_cd", "lambda": 2.0, "value": "value:cdq"}  # in the engine
PER_TOKEN = {**TOKENWISE, "top_k": 5}  # FUDGE-style top-k: one engine round trip per token


def test_blockwise_with_a_fudge_head(cd_server):
    r = chat(cd_server, BLOCKWISE)
    assert r.status_code == 200, r.text
    a = r.json()["alignment"]
    tokens = r.json()["usage"]["completion_tokens"]
    assert a["blocks"] == math.ceil(tokens / 8) and a["blocks"] >= 2
    # c · ⌈max_tokens / M⌉ with the default max_tokens 24 and M = 8
    assert a["kl_bound"] == pytest.approx(3 * (math.log(3) - 2 / 3))
    assert tokens <= a["generated_tokens"] <= 3 * 8 * a["blocks"]
    assert a["reward"] is not None  # the final answer is scored by the request's reward

    pieces, info = stream(cd_server, BLOCKWISE)
    assert 2 <= len(pieces) <= info["blocks"]  # one chunk per accepted block (text held back
    assert "".join(pieces).strip()  # only where a block ends inside a character)


def test_tokenwise_with_a_cdq_head(cd_server):
    r = chat(cd_server, PER_TOKEN)
    assert r.status_code == 200, r.text
    body = r.json()
    a = body["alignment"]
    assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["message"]["content"]
    assert a["kl_estimate"] >= 0 and math.isfinite(a["kl_estimate"]) and not a["in_engine"]

    # λ = 0 samples from the policy's top-k itself: no tilt, no KL
    r = chat(cd_server, {**PER_TOKEN, "lambda": 0.0})
    assert r.status_code == 200
    a0 = r.json()["alignment"]  # λ = 0: only the mass outside the top k moves away from p
    assert a0["kl_estimate"] == pytest.approx(a0["kl_outside_top_k"])


def test_tokenwise_in_the_engine(cd_server):
    """The CD-Q logits processor: one engine request per answer, KL from the processor."""
    r = chat(cd_server, TOKENWISE, max_tokens=16)
    assert r.status_code == 200, r.text
    body = r.json()
    a = body["alignment"]
    assert a["in_engine"] and a["top_k"] is None
    assert a["steps"] == body["usage"]["completion_tokens"] >= 1
    assert 0 <= a["kl_estimate"] <= a["kl_bound"] and math.isfinite(a["kl_bound"])

    # streamed token by token, and the same answer as unstreamed with the same seed
    pieces, info = stream(cd_server, TOKENWISE, max_tokens=12, seed=11)
    assert len(pieces) >= 2 and info["in_engine"] and info["kl_estimate"] >= 0
    r = chat(cd_server, TOKENWISE, max_tokens=12, seed=11)
    assert "".join(pieces) == r.json()["choices"][0]["message"]["content"]

    # λ = 0 is plain sampling: the same seed gives vLLM's own text for the same ids (so the
    # answer's text, decoded from its ids, is what plain sampling prints), and no KL
    for seed in (3, 4):
        tilted = chat(cd_server, {**TOKENWISE, "lambda": 0.0}, max_tokens=20, seed=seed).json()
        plain = httpx.post(f"{cd_server.base_url}/v1/chat/completions", timeout=600, json={
            "messages": PROMPT, "max_tokens": 20, "temperature": 1.0, "seed": seed}).json()
        assert tilted["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
        assert tilted["alignment"]["kl_estimate"] == 0.0


def test_tokenwise_in_the_engine_aborts_on_disconnect(cd_server):
    before = cd_server.metric("alignserve:engine_aborts_total")
    body = {"messages": PROMPT, "max_tokens": 400, "temperature": 1.0, "stream": True,
            "alignment": TOKENWISE}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{cd_server.base_url}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                event = json.loads(line[6:]) if line.startswith("data: {") else {}
                if any(c["delta"].get("content") for c in event.get("choices", [])):
                    break  # the first token arrived: the engine request is running
    unfinished = "alignserve:engine_requests_unfinished"
    assert wait_until(lambda: cd_server.metric(unfinished) == 0, 10), "engine request still running"
    assert wait_until(lambda: cd_server.metric("alignserve:engine_aborts_total") > before, 5)


def test_heads_are_scorers(cd_server):
    # a FUDGE head has no per-token Q values
    r = chat(cd_server, {**PER_TOKEN, "value": "value:fudge"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("alignment")
    r = chat(cd_server, {**TOKENWISE, "value": "value:missing"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_scorer"
    # value heads score whole answers too: best-of-n and speculative rejection take them as reward
    for alignment in ({"strategy": "best_of_n", "n": 3, "reward": "value:fudge"},
                      {"strategy": "speculative_rejection", "n": 4, "decision_tokens": 4,
                       "reward": "value:cdq"}):
        r = chat(cd_server, alignment, max_tokens=16)
        assert r.status_code == 200, r.text
        assert math.isfinite(r.json()["alignment"]["reward"])


def test_a_head_outlives_a_policy_swap(cd_server, safedpo_checkpoint):
    r = httpx.post(f"{cd_server.base_url}/admin/policies", headers=ADMIN, timeout=600,
                   json={"name": "safedpo", "path": str(safedpo_checkpoint), "activate": True})
    assert r.status_code == 200, r.text
    try:
        r = chat(cd_server, BLOCKWISE)
        assert r.status_code == 200, r.text
        assert r.headers["x-alignserve-policy"] == "safedpo" and r.json()["alignment"]["blocks"] >= 1
        r = chat(cd_server, TOKENWISE)
        assert r.status_code == 200, r.text
    finally:
        httpx.post(f"{cd_server.base_url}/admin/policies/base/activate", headers=ADMIN,
                   timeout=600)
