"""Speculative rejection on the real engine: token-exact rounds, the best candidate returned."""

from __future__ import annotations

import math

import pytest

from server.model_prep import embedded_model_dir
from server.settings import Settings

pytestmark = pytest.mark.integration

ASK = [{"role": "user", "content": "Give me three tips for sleeping better."}]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir(Settings().home))


def spr(client, model_name, **kw):
    alignment = {"strategy": "speculative_rejection", "n": 8, "alpha": 0.5, "decision_tokens": 8,
                 "return_candidates": True, **kw.pop("alignment", {})}
    return client.chat.completions.create(model=model_name, messages=ASK, max_tokens=48,
                                          temperature=1.0, extra_body={"alignment": alignment},
                                          **kw)


def test_rounds_are_token_exact(client, model_name, tokenizer):
    r = spr(client, model_name)
    a = r.model_extra["alignment"]
    assert a["rounds"] >= 2 and sum(a["rejected"]) > 0
    for c in a["candidates"]:
        ids = c["token_ids"]
        assert c["tokens"] == len(ids) <= 48
        # The text of every candidate, stitched from several engine calls, is exactly the
        # decoding of its ids: nothing dropped or duplicated at a decision point.
        assert tokenizer.decode(ids, skip_special_tokens=True) == c["text"]
    chosen = next(c for c in a["candidates"] if c["text"] == r.choices[0].message.content)
    # Greedy re-tokenisation of the text gives back the ids whenever the model sampled the
    # canonical segmentation (it may not: tokenisation is not injective); the chosen answer's
    # ids must decode to its text either way.
    assert tokenizer.decode(chosen["token_ids"], skip_special_tokens=True) == chosen["text"]
    finished = [c for c in a["candidates"] if c["finish_reason"] is not None]
    assert chosen in finished
    assert a["reward"] == max(c["reward"] for c in finished)
    # Every token the engine produced is counted, the rejected ones' too.
    assert a["generated_tokens"] == sum(c["tokens"] for c in a["candidates"])
    assert a["generated_tokens"] < 8 * 48
    assert a["kl_bound"] == pytest.approx(math.log(8)) and a["kl_estimate"] is None


def test_streaming_and_choices(client, model_name):
    stream = spr(client, model_name, n=2, stream=True, alignment={"alpha": 0.75})
    chunks = list(stream)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(c.choices[0].index for c in finals) == [0, 1]
    for c in finals:
        assert c.model_extra["alignment"]["strategy"] == "speculative_rejection"
        assert c.model_extra["alignment"]["rounds"] >= 1
