"""Blockwise controlled decoding (Mudgal et al. 2024) on the real engine, guided by the
`relevance` text scorer on partial answers; streamed and not.

tokenwise_cd needs a trained CD-Q head, wired by the team at the end; its engine path
(`Sampling.top_logprobs` → vLLM `logprobs=k`) is covered here only in so far as the server
starts with the new engine code. A direct VllmEngine test would start a second engine.
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.integration

ASK = [{"role": "user", "content": "Give me three tips for sleeping better."}]
K, BLOCK, MAX = 4, 8, 32


def blockwise(client, model_name, **kw):
    return client.chat.completions.create(
        model=model_name, messages=ASK, max_tokens=MAX, temperature=1.0,
        extra_body={"alignment": {"strategy": "blockwise_cd", "n": K, "block_tokens": BLOCK,
                                  "value": "relevance"}}, **kw)


def check_accounting(a: dict, answer_tokens: int) -> None:
    assert a["strategy"] == "blockwise_cd" and a["value"] == "relevance"
    # the first block may be longer (aligned to the KV block size, decoding/blockwise_cd.py)
    first = a["first_block_tokens"]
    assert BLOCK <= first < 2 * BLOCK
    assert a["blocks"] >= 2 and a["blocks"] == 1 + math.ceil(max(answer_tokens - first, 0) / BLOCK)
    # c · ⌈max_tokens / M⌉ (chain rule over every block the answer could use)
    assert a["kl_bound"] == pytest.approx(math.ceil(MAX / BLOCK) * (math.log(K) - (K - 1) / K))
    assert 0 <= a["kl_estimate"] <= a["kl_bound"] + 1e-9
    # all K candidates of every block are counted; they stop early only at EOS, rare in 8 tokens
    longest = min(MAX, first + (a["blocks"] - 1) * BLOCK)
    assert 0.75 * K * answer_tokens <= a["generated_tokens"] <= K * longest
    assert a["scored_candidates"] == K * a["blocks"]
    assert -1.0 <= a["reward"] <= 1.0  # relevance (cosine) of the final answer


def test_blockwise_over_http(client, model_name):
    r = blockwise(client, model_name)
    text = r.choices[0].message.content
    assert text.strip()
    check_accounting(r.model_extra["alignment"], r.usage.completion_tokens)


def test_blockwise_streams_one_chunk_per_block(client, model_name):
    chunks = list(blockwise(client, model_name, stream=True,
                            stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    a = final.model_extra["alignment"]
    assert chunks.index(final) > max(i for i, c in enumerate(chunks)
                                     if c.choices and c.choices[0].delta.content)
    # one content chunk per accepted block (a block whose text is all held back, e.g. an
    # unfinished multi-byte character, joins the next one)
    assert 2 <= len(pieces) <= a["blocks"]
    usage = chunks[-1].usage
    check_accounting(a, usage.completion_tokens)
    assert "".join(pieces).strip()
