"""vLLM's prefix cache hits for blockwise CD on the real engine, and its counters are on
/metrics (`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries`, in prompt tokens)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

# Long enough to fill several KV blocks at any block size alignserve picks (≤ 128 tokens):
# every block's K candidates and every resubmitted prefix start with these full blocks.
LONG = ("I keep waking up at night and then lie awake for hours, my mind racing about work "
        "and the next day. I have tried reading before bed, a warm bath and no screens after "
        "nine, but nothing has helped for long. ") * 3 + "What else could I try?"


def test_blockwise_cd_hits_the_prefix_cache(server, client, model_name):
    hits0 = server.metric("vllm:prefix_cache_hits_total")
    queries0 = server.metric("vllm:prefix_cache_queries_total")
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": LONG}], max_tokens=32,
        temperature=1.0, extra_body={"alignment": {"strategy": "blockwise_cd", "n": 4,
                                                   "block_tokens": 8, "value": "relevance"}})
    assert r.model_extra["alignment"]["blocks"] >= 2
    hits = server.metric("vllm:prefix_cache_hits_total") - hits0
    queries = server.metric("vllm:prefix_cache_queries_total") - queries0
    assert queries > 0 and hits / queries > 0
