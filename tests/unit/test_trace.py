"""The decision trace in the answer (issue 24) on the fakes: it is consistent with the answer —
best-of-n's chosen candidate is the argmax of the listed objectives, speculative rejection's
pruned tracks are the lowest scored at their decision point, blockwise CD's kept block is the
argmax of its values — and it never changes the answer."""

import httpx
import pytest
from fakes import FakeEngine, make_app

MSG = [{"role": "user", "content": "say something good"}]


async def _alignment(alignment: dict, seed: int = 7, **body) -> dict:
    app = make_app(FakeEngine(seed=seed))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json={
            "messages": MSG, "max_tokens": 12, "seed": seed, "alignment": alignment, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("seed", range(5))
async def test_best_of_n_marks_the_argmax_of_the_listed_objectives(seed):
    body = await _alignment({"strategy": "best_of_n", "n": 6, "cost": "bad_count",
                             "cost_weight": 0.5, "return_candidates": True}, seed)
    info = body["choices"][0]["alignment"]
    cands = info["candidates"]
    for c in cands:
        assert c["objective"] == pytest.approx(c["reward"] - 0.5 * c["cost"])
        assert c["rank"] == 1 + sum(o["objective"] > c["objective"] for o in cands)
    (chosen,) = [c for c in cands if c["chosen"]]
    assert chosen["objective"] == max(c["objective"] for c in cands) and chosen["rank"] == 1
    assert chosen["text"] == body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("seed", range(5))
async def test_speculative_rejection_prunes_the_lowest_at_each_point(seed):
    body = await _alignment({"strategy": "speculative_rejection", "n": 8, "alpha": 0.5,
                             "decision_tokens": 2, "return_candidates": True}, seed,
                            max_tokens=16)
    info = body["choices"][0]["alignment"]
    points = info["decision_points"]
    assert len(points) == len(info["rejected"]) == info["rounds"] - 1
    for point, rejected in zip(points, info["rejected"]):
        scores = dict((i, s) for i, s in point["scores"])
        pruned, kept = set(point["pruned"]), set(scores) - set(point["pruned"])
        assert len(pruned) == rejected == point["pool"] - point["kept"]
        assert len(kept) == point["kept"]
        assert max(scores[i] for i in pruned) <= min(scores[i] for i in kept)
    cands = info["candidates"]
    (chosen,) = [i for i, c in enumerate(cands) if c["chosen"]]
    assert chosen == info["chosen_index"]
    assert cands[chosen]["text"] == body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("seed", range(3))
async def test_blockwise_keeps_the_argmax_of_each_blocks_values(seed):
    body = await _alignment({"strategy": "blockwise_cd", "n": 4, "block_tokens": 4,
                             "return_candidates": True}, seed)
    info = body["choices"][0]["alignment"]
    blocks = info["block_trace"]
    assert len(blocks) == info["blocks"]
    for b in blocks:
        values = [c["value"] for c in b["candidates"]]
        assert b["kept"] == values.index(max(values))  # first of equal values
    kept_text = "".join(b["candidates"][b["kept"]]["text"] for b in blocks)
    assert kept_text == body["choices"][0]["message"]["content"]


async def test_the_trace_never_changes_the_answer():
    for alignment in ({"strategy": "best_of_n", "n": 5},
                      {"strategy": "speculative_rejection", "n": 8, "decision_tokens": 2},
                      {"strategy": "blockwise_cd", "n": 3, "block_tokens": 4}):
        plain = await _alignment(alignment)
        traced = await _alignment({**alignment, "return_candidates": True})
        assert plain["choices"][0]["message"] == traced["choices"][0]["message"]


async def test_soft_best_of_n_reports_each_candidates_selection_probability():
    import math

    body = await _alignment({"strategy": "soft_best_of_n", "n": 5, "selection_temperature": 0.5,
                             "return_candidates": True})
    cands = body["choices"][0]["alignment"]["candidates"]
    z = sum(math.exp(c["objective"] / 0.5) for c in cands)
    for c in cands:
        assert c["selection_probability"] == pytest.approx(math.exp(c["objective"] / 0.5) / z)
    assert "selection_probabilities" not in body["choices"][0]["alignment"]


async def test_trace_alone_is_the_trace_without_token_ids():
    plain = await _alignment({"strategy": "best_of_n", "n": 4})
    body = await _alignment({"strategy": "best_of_n", "n": 4, "trace": True})
    cands = body["choices"][0]["alignment"]["candidates"]
    assert len(cands) == 4 and sum(c["chosen"] for c in cands) == 1
    assert all(c["token_ids"] is None and c["rank"] >= 1 for c in cands)
    assert body["choices"][0]["message"] == plain["choices"][0]["message"]


async def test_tokenwise_traces_per_token_kl_and_the_strongest_pushes():
    from fakes import FakeQHead
    from test_controlled_decoding import LOGP, TOKENWISE, Q, tokenwise

    from decoding.context import DecodeContext

    engine = FakeEngine()
    engine.next_logprobs = dict(LOGP)
    req = tokenwise(FakeQHead(Q), top_k=3, lam=1.5, max_tokens=5, seed=4)
    req.return_candidates = True
    res = await TOKENWISE.run(req, DecodeContext(engine))
    assert len(res.extra["token_kl"]) == 5
    assert sum(res.extra["token_kl"]) == pytest.approx(res.kl_estimate)
    first = res.extra["pushes"][0]["tokens"]
    assert [t["token_id"] for t in first] == [2, 1, 0]  # by λ·Q: Q = 2, 1, 0 in the top 3
    assert first[0]["push"] == pytest.approx(1.5 * Q[2])
    assert sum(t["tilted"] for t in first) == pytest.approx(1.0)
