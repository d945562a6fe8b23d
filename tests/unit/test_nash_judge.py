"""Nash with a pairwise judge (decoding/pairwise.py): the llm-judge's matrix on a fake engine
whose "judgement" is a known function of the two answers, the strategy, and the API's 400s."""

import math
import re

import numpy as np
import pytest
from fakes import FakeEngine, FixedScores, sse_events, streamed_text

from decoding import pairwise
from decoding.context import DecodeContext
from decoding.errors import EngineRejected
from decoding.pairwise import LLMJudge, check_preferences
from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES
from decoding.types import Sample, Sampling

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "say something good"}],
        "max_tokens": 8}
_PAIR = re.compile(r"Answer A:(?P<a>.*) Answer B:(?P<b>.*) Which answer is better")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class JudgingEngine(FakeEngine):
    """A FakeEngine whose one-token judge calls answer with logit(P_A) = k·(words(A) −
    words(B)) + position: a judge that likes longer answers and, by `position`, slot A."""

    def __init__(self, k: float = 1.0, position: float = 0.0, **kw) -> None:
        super().__init__(**kw)
        self.k, self.position = k, position
        self.judge_calls: list[Sampling] = []

    async def generate(self, prompt_ids, n, sampling):
        if sampling.max_tokens != 1 or not sampling.logit_bias:
            return await super().generate(prompt_ids, n, sampling)
        self.judge_calls.append(sampling)
        m = _PAIR.search(self.tokenizer.decode(prompt_ids))
        assert m is not None, "the judge prompt holds both answers in its template"
        logit = self.k * (len(m["a"].split()) - len(m["b"].split())) + self.position
        a, b = self.tokenizer.vocab["A"], self.tokenizer.vocab["B"]
        pa = _sigmoid(logit)
        top = {a: math.log(pa) if pa > 0 else -math.inf,
               b: math.log1p(-pa) if pa < 1 else -math.inf}
        return [Sample([a], " A", [top[a]], "length", [top])]


def request(n, **kw):
    return DecodeRequest(prompt_ids=[1, 2, 3], prompt_text="hello",
                         sampling=Sampling(max_tokens=12), n=n,
                         objective=Objective(FixedScores([0.0] * n)), **kw)


def judge_opts(name="llm-judge"):
    return STRATEGIES["nash"].Options(judge=name)


async def test_the_matrix_averages_both_orders_and_cancels_position_bias():
    engine = JudgingEngine(k=0.5, position=1.2)
    judge = LLMJudge(engine)
    answers = ["one", "one two three", "a b", "x y z w"]
    p = np.asarray(await judge.prefer("q", answers))
    n = len(answers)
    assert np.allclose(p + p.T, 1) and np.allclose(np.diag(p), 0.5)
    for i in range(n):
        for j in range(n):
            if i != j:
                d = len(answers[i].split()) - len(answers[j].split())
                # ½[P_A(i, j) + P_B(j, i)] with P_B(j, i) = 1 − P_A(j, i)
                want = 0.5 * (_sigmoid(0.5 * d + 1.2) + 1 - _sigmoid(-0.5 * d + 1.2))
                assert p[i, j] == pytest.approx(want)
    assert judge.calls == n * (n - 1) == len(engine.judge_calls)
    check_preferences(p, n, "llm-judge")
    # every call: one token, both letters biased equally, their log-probs asked for
    for s in engine.judge_calls:
        assert s.max_tokens == 1 and s.top_logprobs == 2 and s.temperature == 1.0
        assert len({bias for _, bias in s.logit_bias}) == 1 and len(s.logit_bias) == 2


async def test_a_pure_position_bias_cancels_to_indifference():
    judge = LLMJudge(JudgingEngine(k=0.0, position=3.0))
    p = await judge.prefer("q", ["a", "b c", "d e f"])
    assert np.allclose(p, 0.5)


async def test_a_judge_preferring_longer_answers_gives_the_longest_a_condorcet_win():
    engine = JudgingEngine(k=2.0, position=0.7, seed=5)
    res = await STRATEGIES["nash"].run(request(5, options=judge_opts(), seed=1,
                                               return_candidates=True), DecodeContext(engine))
    lengths = [len(c.sample.token_ids) for c in res.candidates]
    longest = int(np.argmax(lengths))
    assert lengths.count(max(lengths)) == 1, "seed 5 draws one longest candidate"
    assert res.extra["condorcet_winner"] == longest == res.extra["chosen_index"]
    assert res.extra["lottery"][longest] == pytest.approx(1)
    assert res.sample.text == res.candidates[longest].sample.text
    p = np.asarray(res.extra["preference_matrix"])
    assert np.allclose(p + p.T, 1, atol=1e-5) and (p[longest, np.arange(5) != longest] > 0.5).all()
    assert res.extra["judge"] == "llm-judge" and res.extra["judge_engine_calls"] == 5 * 4
    assert res.extra["judge_abstained"] == 0
    # the objective read 5 answers; the judge read each answer in 2·4 prompts
    assert res.extra["scorer_calls"] == 5 + 5 * 2 * 4
    assert res.extra["scored_tokens"] == (1 + 2 * 4) * sum(lengths)
    assert "users" not in res.extra and "user_utilities" not in res.extra
    assert res.kl_bound == pytest.approx(math.log(5)) and res.kl_estimate is None
    assert res.reward == 0.0 and 0 < res.extra["win_rate_estimate"] < 1


class Cyclic:
    """A pairwise scorer with rock–paper–scissors preferences over three candidates."""

    name = "cyclic"

    async def prefer(self, prompt, candidates):
        return [[0.5, 0.9, 0.1], [0.1, 0.5, 0.9], [0.9, 0.1, 0.5]]


async def test_nash_with_a_judge_answers_from_the_lotterys_support(monkeypatch):
    monkeypatch.setitem(pairwise.JUDGES, "llm-judge", lambda engine: Cyclic())
    drawn = set()
    for seed in range(10):
        res = await STRATEGIES["nash"].run(request(3, options=judge_opts(), seed=seed,
                                                   return_candidates=True),
                                           DecodeContext(FakeEngine(seed=3)))
        q, i = res.extra["lottery"], res.extra["chosen_index"]
        assert q == pytest.approx([1 / 3] * 3, abs=1e-6) and q[i] > 0
        assert res.extra["condorcet_winner"] is None and res.extra["judge"] == "cyclic"
        assert res.sample.text == res.candidates[i].sample.text
        drawn.add(i)
    assert drawn == {0, 1, 2}


async def test_a_judge_breaking_antisymmetry_fails_the_request_named(monkeypatch):
    class Broken(Cyclic):
        async def prefer(self, prompt, candidates):
            return [[0.5, 0.9, 0.9], [0.9, 0.5, 0.9], [0.1, 0.1, 0.5]]

    monkeypatch.setitem(pairwise.JUDGES, "llm-judge", lambda engine: Broken())
    with pytest.raises(RuntimeError, match="cyclic"):
        await STRATEGIES["nash"].run(request(3, options=judge_opts()),
                                     DecodeContext(FakeEngine(seed=3)))


async def test_no_letter_among_the_log_probs_counts_half():
    judge = LLMJudge(FakeEngine(seed=1))  # ignores the bias: its top log-probs are words
    p = await judge.prefer("q", ["good", "bad nice"])
    assert p == [[0.5, 0.5], [0.5, 0.5]] and judge.abstained == 2


async def test_a_comparison_over_the_context_is_refused_naming_max_tokens():
    judge = LLMJudge(JudgingEngine(max_model_len=12))
    with pytest.raises(EngineRejected) as err:
        await judge.prefer("q", ["a b c d e", "f g h i j"])
    assert err.value.param == "max_tokens"


@pytest.mark.parametrize("alignment,param", [
    ({"judge": "nobody"}, "alignment.judge"),
    ({"judge": "relevance"}, "alignment.judge"),  # a scorer, not a pairwise judge
    ({"judge": "llm-judge", "reward": "ensemble:good_count,-bad_count"}, "alignment.reward"),
    ({"judge": "llm-judge", "n": 17}, "alignment.n"),
])
async def test_api_refuses_a_judge_that_is_not_one_or_comes_with_a_panel(client, alignment,
                                                                         param):
    req = {**CHAT, "alignment": {"strategy": "nash", "n": 3, **alignment}}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "judge" in err["message"]
    assert "not an option" not in err["message"]  # refused for what it is, not as unknown


async def test_api_nash_with_the_llm_judge(client):
    req = {**CHAT, "seed": 2, "alignment": {"strategy": "nash", "n": 3, "judge": "llm-judge",
                                            "reward": "good_count", "return_candidates": True}}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    a = r.json()["alignment"]
    assert a["judge"] == "llm-judge" and a["judge_engine_calls"] == 6
    assert a["judge_abstained"] == 6  # the fake engine ignores the letters' bias: all ½
    p = np.asarray(a["preference_matrix"])
    assert p.shape == (3, 3) and np.allclose(p + p.T, 1)
    i = a["chosen_index"]
    assert a["lottery"][i] > 0
    assert r.json()["choices"][0]["message"]["content"] == a["candidates"][i]["text"]


async def test_api_nash_with_the_llm_judge_streams_its_answer(client):
    req = {**CHAT, "stream": True, "alignment": {"strategy": "nash", "n": 3,
                                                 "judge": "llm-judge"}}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200
    events = sse_events(r.text)
    text = streamed_text(events)
    final = [e["alignment"] for e in events if e.get("alignment")]
    assert text and final and final[-1]["judge"] == "llm-judge"
    assert len(final[-1]["preference_matrix"]) == 3
