"""Every bad input gets an OpenAI-shaped 4xx from the real server, which keeps serving."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "hi"}]

CASES = [
    ("invalid json", b"{\"messages\": [", 400),
    ("missing messages", {"max_tokens": 4}, 400),
    ("empty messages", {"messages": []}, 400),
    ("negative max_tokens", {"messages": MSG, "max_tokens": -5}, 400),
    ("huge max_tokens", {"messages": MSG, "max_tokens": 10**7}, 400),
    ("zero n", {"messages": MSG, "n": 0}, 400),
    ("huge n", {"messages": MSG, "n": 10**4}, 400),
    ("huge alignment n", {"messages": MSG, "alignment": {"strategy": "best_of_n", "n": 10**5}}, 400),
    ("unknown strategy", {"messages": MSG, "alignment": {"strategy": "wishful"}}, 400),
    ("unknown scorer", {"messages": MSG, "alignment": {"strategy": "best_of_n", "reward": "x"}}, 400),
    ("missing hf model", {"messages": MSG, "alignment": {"strategy": "best_of_n",
                                                        "reward": "hf:/nonexistent/model"}}, 400),
    ("prompt over the limit", {"messages": [{"role": "user", "content": "hello " * 2000}]}, 400),
    ("prompt + max_tokens over context", {"messages": [{"role": "user", "content": "hello " * 400}],
                                          "max_tokens": 1000}, 400),
    ("wrong type", {"messages": MSG, "temperature": "hot"}, 400),
    # greedy candidates are identical (vLLM refuses n > 1 at temperature 0): a 400, not a 500
    ("greedy best-of-n", {"messages": MSG, "temperature": 0,
                          "alignment": {"strategy": "best_of_n", "n": 4}}, 400),
    ("greedy choices", {"messages": MSG, "temperature": 0, "n": 2}, 400),
]


@pytest.mark.parametrize("name,body,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, name, body, status):
    url = f"{server.base_url}/v1/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and "code" in err and "param" in err
    ok = httpx.post(url, json={"messages": MSG, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
