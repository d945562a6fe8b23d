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
