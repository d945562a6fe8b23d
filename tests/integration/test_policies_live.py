"""Policy hot-swap on the real engine: a perturbed copy of SmolLM2 is swapped in through
/admin/policies while streams run (none fails, all complete), changes the greedy answer, and
swapping back to "base" restores it; incompatible checkpoints are refused with a 400 and
change nothing. A server of its own (admin key), so the shared session server keeps its weights.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from live import wait_until

pytestmark = pytest.mark.integration

ADMIN_KEY = "live-policy-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
GREEDY = {"messages": [{"role": "user", "content": "Name three colours of the rainbow."}],
          "max_tokens": 48, "temperature": 0}
STORY = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper "
                                                   "and a storm, with many details."}],
         "max_tokens": 160, "temperature": 1.0, "stream": True}
STREAMS = 6


def _base_folder(srv) -> Path:
    r = httpx.get(f"{srv.base_url}/admin/policies", headers=ADMIN, timeout=10).json()
    return Path(r["data"][0]["path"])


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy(src, dst)


@pytest.fixture(scope="module")
def policy_server(launch_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy-server")
    # the checkpoints this module registers live in pytest's temp folders
    with launch_server(folder / "server.log", ["--kv-cache-gib", "1", "--policy-root",
                                               str(tmp_path_factory.getbasetemp())],
                       env={"ALIGNSERVE_ADMIN_KEY": ADMIN_KEY}) as srv:
        yield srv


@pytest.fixture(scope="module")
def tuned(policy_server, tmp_path_factory) -> Path:
    """A compatible checkpoint: the base weights plus seeded Gaussian noise (5% of each
    tensor's std), saved as float32 safetensors next to the same config and tokenizer files."""
    import torch
    from safetensors.torch import load_file, save_file

    base = _base_folder(policy_server)
    out = tmp_path_factory.mktemp("tuned")
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    gen = torch.Generator().manual_seed(0)
    weights = load_file(str(base / "model.safetensors"))
    noisy = {n: (t + 0.05 * t.float().std() * torch.randn(t.shape, generator=gen)).float()
             .contiguous() for n, t in weights.items()}
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def base_answer(policy_server) -> str:
    return greedy(policy_server)


def greedy(srv, expect_policy: str | None = None) -> str:
    r = httpx.post(f"{srv.base_url}/v1/chat/completions", json=GREEDY, timeout=120)
    assert r.status_code == 200, r.text
    if expect_policy is not None:
        assert r.headers["x-alignserve-policy"] == expect_policy
    return r.json()["choices"][0]["message"]["content"]


def post_policy(srv, body: dict, path: str = "/admin/policies") -> httpx.Response:
    return httpx.post(f"{srv.base_url}{path}", json=body, headers=ADMIN, timeout=600)


def stream_story(base_url: str, started: threading.Event) -> dict:
    """One streaming chat request, read to the end; what it saw."""
    out = {"policy": None, "text": "", "done": False, "errors": [], "finish": None, "status": None}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=STORY, timeout=600) as r:
        out["status"], out["policy"] = r.status_code, r.headers.get("x-alignserve-policy")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                out["done"] = True
                continue
            event = json.loads(data)
            if "error" in event:
                out["errors"].append(event["error"])
                continue
            choice = event["choices"][0]
            out["text"] += choice["delta"].get("content") or ""
            out["finish"] = choice["finish_reason"] or out["finish"]
            if out["text"]:
                started.set()
    return out


def test_incompatible_checkpoints_are_refused_and_change_nothing(policy_server, base_answer,
                                                                 tmp_path):
    base = _base_folder(policy_server)
    config = json.loads((base / "config.json").read_text())
    cases = {}
    for field, value in (("vocab_size", 50_000), ("hidden_size", 512)):
        folder = tmp_path / field
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, field: value}))
        # a link, not a symlink: a symlink out of the policy root is refused (path_not_found)
        _link_or_copy(base / "model.safetensors", folder / "model.safetensors")
        cases[field] = (folder, "incompatible_checkpoint")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(base / "config.json", empty / "config.json")
    cases["no weights"] = (empty, "missing_weights")
    cases["not found"] = (tmp_path / "does-not-exist", "path_not_found")
    for case, (folder, code) in cases.items():
        r = post_policy(policy_server, {"name": "bad", "path": str(folder)})
        assert r.status_code == 400, (case, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["param"] == "path" and err["message"], case
    listing = httpx.get(f"{policy_server.base_url}/admin/policies", headers=ADMIN).json()
    assert listing["active"] == "base" and listing["swaps"] == 0
    assert greedy(policy_server, "base") == base_answer


def test_swap_while_streaming_then_swap_back(policy_server, tuned, base_answer):
    url = policy_server.base_url
    started = [threading.Event() for _ in range(STREAMS)]
    with concurrent.futures.ThreadPoolExecutor(STREAMS + 4) as pool:
        streams = [pool.submit(stream_story, url, ev) for ev in started]
        assert all(ev.wait(300) for ev in started), "streams did not start"
        in_flight = httpx.get(f"{url}/admin/status", headers=ADMIN).json()["requests_in_flight"]
        swap = pool.submit(post_policy, policy_server, {"name": "tuned", "path": str(tuned)})
        assert wait_until(lambda: httpx.get(f"{url}/admin/policies", headers=ADMIN)
                          .json()["swapping"] or swap.done(), 60)
        # requests arriving during the swap queue and are answered by the new policy
        late = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=GREEDY, timeout=600)
                for _ in range(2)]
        t0 = time.monotonic()
        r = swap.result(timeout=600)
        admin_wait_s = time.monotonic() - t0
        results = [f.result(timeout=600) for f in streams]
        late = [f.result(timeout=600) for f in late]
    assert r.status_code == 200, r.text
    info = r.json()["swap"]
    print(f"\nswap: {in_flight} requests in flight at POST, {info}, admin waited "
          f"{admin_wait_s:.1f} s after the late requests")
    for res in results:  # every stream completes, on the weights it started with
        assert res["status"] == 200 and res["done"] and not res["errors"], res
        assert res["finish"] in ("stop", "length") and res["text"] and res["policy"] == "base"
    assert info["drained_requests"] >= 1 and info["reload_s"] > 0
    for resp in late:
        assert resp.status_code == 200 and resp.headers["x-alignserve-policy"] == "tuned"
    tuned_answer = greedy(policy_server, "tuned")
    assert tuned_answer != base_answer
    assert policy_server.metric('alignserve:policy_active{policy="tuned"}') == 1
    assert policy_server.metric("alignserve:policy_swaps_total") >= 1

    r = post_policy(policy_server, {}, "/admin/policies/base/activate")
    assert r.status_code == 200 and r.json()["active"], r.text
    print(f"swap back: {r.json()['swap']}")
    assert greedy(policy_server, "base") == base_answer
    listing = httpx.get(f"{url}/admin/policies", headers=ADMIN).json()
    assert listing["active"] == "base" and listing["swaps"] == 2
    # a registered policy comes back by name (no path), with the same weights as before
    r = post_policy(policy_server, {"name": "tuned"})
    assert r.status_code == 200 and greedy(policy_server, "tuned") == tuned_answer
    assert post_policy(policy_server, {}, "/admin/policies/base/activate").status_code == 200


def seeded(srv, policy: str) -> tuple[str, float]:
    """A seeded sample at temperature 1 and its log-probability under the serving policy: a
    few SafeDPO steps may leave the greedy answer as it was, but not this log-probability."""
    body = {**GREEDY, "temperature": 1.0, "seed": 11,
            "alignment": {"strategy": "best_of_n", "n": 1, "return_candidates": True}}
    r = httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.headers["x-alignserve-policy"] == policy, r.text
    (cand,) = r.json()["alignment"]["candidates"]
    return cand["text"], cand["logprob"]


def test_safedpo_checkpoint_swaps_in_while_streaming(policy_server, safedpo_checkpoint,
                                                     base_answer):
    """The issue's end-to-end path: `alignserve finetune safedpo` → loaded through the admin
    API while streams run → no request fails and the policy's outputs change."""
    url = policy_server.base_url
    before = seeded(policy_server, "base")
    assert seeded(policy_server, "base") == before  # seeded sampling is reproducible
    started = [threading.Event() for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream_story, url, ev) for ev in started]
        assert all(ev.wait(300) for ev in started), "streams did not start"
        r = post_policy(policy_server, {"name": "safedpo", "path": str(safedpo_checkpoint)})
        results = [f.result(timeout=600) for f in streams]
    assert r.status_code == 200, r.text
    for res in results:
        assert res["status"] == 200 and res["done"] and not res["errors"], res
    text, logprob = seeded(policy_server, "safedpo")
    assert (text, logprob) != before and logprob != pytest.approx(before[1], abs=1e-6)
    assert post_policy(policy_server, {}, "/admin/policies/base/activate").status_code == 200
    assert seeded(policy_server, "base") == before and greedy(policy_server, "base") == base_answer
