"""particle_filtering (Puri et al. 2025) against the fakes: ESS, systematic resampling (unbiased,
every sample within one copy of n·w), when it resamples, finished particles, KL accounting,
streaming of the particles' common prefix, and the HTTP edge."""

import json
import math
import random
from collections import Counter

import httpx
import pytest
from fakes import FakeEngine, FakeFudgeHead, WordReward, make_app

import decoding.particle_filtering as pf
from decoding.context import DecodeContext
from decoding.particle_filtering import effective_sample_size, normalised, systematic_resample
from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES
from decoding.types import Sampling

PF = STRATEGIES["particle_filtering"]
PROMPT = [101, 102, 103]


class Constant:
    name = "constant"

    def score(self, prompt, responses):
        return [1.0] * len(responses)


def request(k=4, block=4, max_tokens=12, value=None, seed=0, emit=None, stop=(), **opts):
    return DecodeRequest(PROMPT, "p", Sampling(max_tokens=max_tokens, seed=seed, stop=stop), n=k,
                         objective=Objective(WordReward()), seed=seed, value=value, emit=emit,
                         options=PF.Options(block_tokens=block, **opts))


# ------------------------------------------------------------------ ESS and resampling


def test_effective_sample_size():
    assert effective_sample_size([0.25] * 4) == pytest.approx(4)
    assert effective_sample_size([1.0, 0, 0, 0]) == pytest.approx(1)
    assert effective_sample_size([0.5, 0.5, 0, 0]) == pytest.approx(2)
    assert effective_sample_size([3.0, 1.0]) == pytest.approx(16 / 10)  # (Σw)²/Σw², unnormalised
    # log-weights of any scale: normalised, then the same ESS
    assert effective_sample_size(normalised([1000.0, 1000.0, -math.inf])) == pytest.approx(2)
    with pytest.raises(ValueError):
        effective_sample_size([0.0, 0.0])


WEIGHTS = [0.05, 0.4, 0.0, 0.3, 0.25]


@pytest.mark.parametrize("u", [i / 97 for i in range(97)])
def test_systematic_resampling_is_within_one_copy_of_n_w_for_every_u(u):
    counts = Counter(systematic_resample(WEIGHTS, u))
    n = len(WEIGHTS)
    assert sum(counts.values()) == n and counts[2] == 0  # a zero weight is never copied
    for j, w in enumerate(WEIGHTS):
        assert math.floor(n * w) <= counts[j] <= math.ceil(n * w)


def test_systematic_resampling_is_unbiased():
    """E[copies of j] = n·wⱼ over u ~ U[0, 1). Each count is ⌊n·w⌋ or ⌈n·w⌉ (above), so its
    variance is at most ¼ and the mean of S draws has standard error ≤ 1/(2√S): 5 of them
    is the tolerance (seeded, so this never flakes)."""
    rng, s, n = random.Random(0), 4000, len(WEIGHTS)
    totals = Counter()
    for _ in range(s):
        totals.update(systematic_resample(WEIGHTS, rng.random()))
    for j, w in enumerate(WEIGHTS):
        assert abs(totals[j] / s - n * w) <= 5 / (2 * math.sqrt(s))


def test_systematic_resampling_rejects_u_outside_the_unit_interval():
    with pytest.raises(ValueError):
        systematic_resample([1.0], 1.0)


async def test_resampling_on_the_fake_engine_preserves_the_weights_in_expectation(monkeypatch):
    """Every resampling event the strategy performs on the fake engine (200 seeded requests):
    each particle's copies are within one of n·wⱼ, and the mean of (copies − n·wⱼ) over all
    events is 0 within 5 standard errors (each deviation lies in (−1, 1), variance ≤ ¼).
    Also checked through a function of the particles: the resampled set's mean value equals
    the weighted mean before resampling, in expectation."""
    events: list[tuple[list[float], list[int]]] = []
    real = pf.systematic_resample

    def recording(weights, u):
        parents = real(weights, u)
        events.append((list(weights), parents))
        return parents

    monkeypatch.setattr(pf, "systematic_resample", recording)
    head = FakeFudgeHead(tok=0)  # value: how many "good" tokens the partial answer has
    for seed in range(200):
        await PF.run(request(k=6, block=2, max_tokens=8, value=head, seed=seed,
                             ess_threshold=1.0, resampling_temperature=0.5),
                     DecodeContext(FakeEngine(full_length=True)))
    assert len(events) > 200  # several events per request
    deviations = []
    for weights, parents in events:
        n, counts = len(weights), Counter(parents)
        for j, w in enumerate(weights):
            assert abs(counts[j] - n * w) < 1 + 1e-9
            deviations.append(counts[j] - n * w)
    per_event = [sum(d) / len(d) for d in zip(*[iter(deviations)] * 6)]
    assert per_event == pytest.approx([0.0] * len(per_event), abs=1e-9)  # n copies in all
    first = [d for i, d in enumerate(deviations) if i % 6 == 0]  # particle 0 of each event
    assert abs(sum(first) / len(first)) <= 5 / (2 * math.sqrt(len(first)))


# ------------------------------------------------------------------ the strategy


async def test_no_resampling_at_threshold_zero_keeps_n_iid_particles():
    engine = FakeEngine(full_length=True)
    res = await PF.run(request(k=4, block=4, max_tokens=12, value=FakeFudgeHead(tok=0),
                               ess_threshold=0.0), DecodeContext(engine))
    a = res.extra
    assert a["resampled_after_blocks"] == [] and len(a["ess"]) == a["blocks"] == 3
    # the first block: one call for the shared empty prefix; then, without resampling, each
    # particle is continued alone (one call, n = 1, per particle and block)
    assert [n for _, n, _ in engine.calls] == [4] + [1] * 8
    assert res.kl_bound == pytest.approx(math.log(4))  # one of 4 i.i.d. answers
    assert res.win_rate_bound == pytest.approx(4 / 5) and res.kl_estimate is None
    assert res.sample.text.split().count("good") == res.reward
    assert math.fsum(a["final_weights"]) == pytest.approx(1.0, abs=1e-5)


async def test_resampling_happens_exactly_when_the_ess_falls_below_the_threshold():
    seen = 0
    for seed in range(20):
        res = await PF.run(request(k=5, block=2, max_tokens=10, value=FakeFudgeHead(tok=0),
                                   seed=seed, ess_threshold=0.7, resampling_temperature=0.3),
                           DecodeContext(FakeEngine(full_length=True)))
        a = res.extra
        expected = [b for b, ess in enumerate(a["ess"], start=1)
                    if ess < 0.7 * 5 and b < a["blocks"]]  # never after the last block
        assert a["resampled_after_blocks"] == expected
        assert res.kl_bound == pytest.approx(5 * math.log(5)) and res.win_rate_bound is None
        seen += bool(expected) and len(expected) < a["blocks"] - 1
    assert seen  # some requests resampled after some blocks and not after others


async def test_uniform_values_never_resample_even_at_threshold_one():
    res = await PF.run(request(k=4, value=Constant(), ess_threshold=1.0),
                       DecodeContext(FakeEngine(full_length=True)))
    assert res.extra["resampled_after_blocks"] == []
    assert res.extra["ess"] == pytest.approx([4.0] * res.extra["blocks"])


async def test_copies_share_one_engine_call_on_their_exact_prefix():
    engine = FakeEngine(full_length=True)
    res = await PF.run(request(k=6, block=3, max_tokens=9, value=FakeFudgeHead(tok=0),
                               ess_threshold=1.0, resampling_temperature=0.05),
                       DecodeContext(engine))
    assert res.extra["resampled_after_blocks"]
    by_block: dict[int, list] = {}
    for prompt_ids, n, sampling in engine.calls:
        by_block.setdefault(len(prompt_ids), []).append((prompt_ids, n, sampling.seed))
    for calls in by_block.values():
        assert sum(n for _, n, _ in calls) == 6  # one sequence per particle per block
        assert len({tuple(p) for p, _, _ in calls}) == len(calls)  # distinct prefixes
        assert len({s for _, _, s in calls}) == len(calls)  # and disjoint seeds
    assert res.generated_tokens == 6 * 9 and res.scored_candidates == 6 * 3


async def test_finished_particles_are_kept_and_the_answer_is_a_particle():
    for seed in range(10):
        engine = FakeEngine(seed=seed)  # samples end early at random (EOS)
        res = await PF.run(request(k=4, block=3, max_tokens=12, seed=seed, ess_threshold=0.9),
                           DecodeContext(engine))
        a = res.extra
        assert res.sample.finish_reason in ("stop", "length")
        assert len(res.sample.token_ids) <= 12 and a["blocks"] <= 4
        assert res.reward == res.sample.text.split().count("good")
        assert 0 <= a["chosen_index"] < 4


async def test_seeded_requests_give_the_same_answer_and_argmax_picks_the_heaviest():
    head = FakeFudgeHead(tok=0)
    one = await PF.run(request(seed=11, value=head), DecodeContext(FakeEngine(full_length=True)))
    two = await PF.run(request(seed=11, value=head), DecodeContext(FakeEngine(full_length=True)))
    assert one.sample.token_ids == two.sample.token_ids and one.extra == two.extra
    best = await PF.run(request(seed=11, value=head, selection="argmax"),
                        DecodeContext(FakeEngine(full_length=True)))
    w = best.extra["final_weights"]
    assert w[best.extra["chosen_index"]] == max(w)


async def test_streamed_pieces_add_up_to_the_answer():
    for seed in range(10):
        pieces: list[str] = []
        res = await PF.run(request(k=4, block=2, max_tokens=10, seed=seed, emit=pieces.append,
                                   value=FakeFudgeHead(tok=0), ess_threshold=1.0,
                                   resampling_temperature=0.1, stop=("great fine",)),
                           DecodeContext(FakeEngine(seed=seed)))
        assert "".join(pieces) == res.sample.text
        assert all(pieces)


async def test_return_candidates_gives_the_final_particles_with_their_rewards():
    req = request(k=3, value=FakeFudgeHead(tok=1))
    req.return_candidates = True
    res = await PF.run(req, DecodeContext(FakeEngine(full_length=True)))
    assert res.candidates is not None and len(res.candidates) == 3
    assert all(c.reward == c.sample.text.split().count("good") for c in res.candidates)
    assert res.candidates[res.extra["chosen_index"]].sample.text == res.sample.text


# ------------------------------------------------------------------ HTTP


def events(text: str) -> list[dict]:
    lines = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture
async def client():
    app = make_app(FakeEngine(full_length=True))
    app.state.runtime.scorers.register(FakeFudgeHead(tok=0, name="value:fudge"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:
        yield c


ALIGN = {"strategy": "particle_filtering", "n": 4, "block_tokens": 4, "value": "value:fudge",
         "ess_threshold": 1.0, "resampling_temperature": 0.2}


async def test_particle_filtering_over_http(client):
    body = (await client.post("/v1/completions", json={
        "prompt": "hi", "max_tokens": 12, "seed": 3, "alignment": ALIGN})).json()
    a = body["alignment"]
    assert a["strategy"] == "particle_filtering" and a["blocks"] == 3 and len(a["ess"]) == 3
    assert a["resampling"] == "systematic" and a["value"] == "value:fudge"
    assert isinstance(a["resampled_after_blocks"], list) and len(a["final_weights"]) == 4
    assert a["kl_bound"] == pytest.approx(3 * math.log(4)) and a["kl_estimate"] is None
    assert a["reward"] == body["choices"][0]["text"].split().count("good")


async def test_streamed_particle_filtering_sends_the_text_then_the_alignment(client):
    req = {"prompt": "hi", "max_tokens": 12, "seed": 5, "stream": True, "alignment": ALIGN}
    evs = events((await client.post("/v1/completions", json=req)).text)
    content = [e for e in evs if e["choices"] and e["choices"][0]["text"]]
    final = next(i for i, e in enumerate(evs)
                 if e["choices"] and e["choices"][0]["finish_reason"])
    assert content and all(evs.index(e) < final for e in content)
    text = "".join(e["choices"][0]["text"] for e in content)
    plain = (await client.post("/v1/completions", json={**req, "stream": False})).json()
    assert text == plain["choices"][0]["text"]  # seeded: the same answer, streamed
    assert evs[final]["alignment"]["ess"] == plain["alignment"]["ess"]


@pytest.mark.parametrize("alignment,field", [
    ({"ess_threshold": 1.5}, "ess_threshold"),
    ({"resampling_temperature": 0}, "resampling_temperature"),
    ({"selection": "best"}, "selection"),
    ({"block_tokens": 0}, "block_tokens"),
    ({"user_temperature": 1}, "user_temperature"),  # another strategy's option
    ({"value": "ensemble:good_count,bad_count"}, "alignment.value"),  # pool-relative value
])
async def test_bad_particle_filtering_requests_are_400s(client, alignment, field):
    r = await client.post("/v1/completions", json={
        "prompt": "hi", "alignment": {"strategy": "particle_filtering", **alignment}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] or field in (err.get("param") or ""), err
