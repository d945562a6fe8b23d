"""LoRA adapters on the real engine (vLLM runtime LoRA on CPU, `--enable-lora true`): a random
PEFT adapter for SmolLM2 is registered through /admin/policies and chosen per request by `model`;
it changes the greedy answer while requests without it keep the base answer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

ADMIN_KEY = "live-lora-admin-key-0123456789ab"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
GREEDY = {"messages": [{"role": "user", "content": "Name three colours of the rainbow."}],
          "max_tokens": 48, "temperature": 0}


@pytest.fixture(scope="module")
def lora_server(launch_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-server")
    with launch_server(folder / "server.log", ["--kv-cache-gib", "1", "--enable-lora", "true",
                                               "--max-lora-rank", "8"],
                       env={"ALIGNSERVE_ADMIN_KEY": ADMIN_KEY}) as srv:
        yield srv


@pytest.fixture(scope="module")
def adapter(lora_server, tmp_path_factory) -> Path:
    """A rank-8 LoRA on q_proj/v_proj with random (not zero) B, so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    listing = httpx.get(f"{lora_server.base_url}/admin/policies", headers=ADMIN).json()
    base = listing["data"][0]["path"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(str(out))
    return out


def chat(srv, body: dict) -> tuple[str, float]:
    t0 = time.monotonic()
    r = httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], time.monotonic() - t0


def test_adapter_is_chosen_per_request_by_model(lora_server, adapter):
    url = lora_server.base_url
    served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    base_answer, base_s = chat(lora_server, GREEDY)
    r = httpx.post(f"{url}/admin/policies", headers=ADMIN, timeout=300,
                   json={"name": "noisy-lora", "path": str(adapter)})
    assert r.status_code == 200, r.text
    assert r.json()["kind"] == "lora" and r.json()["active"] is False
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert models[1]["id"] == "noisy-lora" and models[1]["parent"] == served

    lora_answer, lora_s = chat(lora_server, {**GREEDY, "model": "noisy-lora"})
    assert lora_answer != base_answer
    assert chat(lora_server, {**GREEDY, "model": "noisy-lora"})[0] == lora_answer
    assert chat(lora_server, GREEDY)[0] == base_answer  # the adapter does not leak
    print(f"\nLoRA: base answer {base_s:.2f} s, adapter answer {lora_s:.2f} s")

    # streaming through the adapter completes
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=300,
                      json={**GREEDY, "model": "noisy-lora", "stream": True}) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if json.loads(e)["choices"])
    assert text == lora_answer

    # an adapter is not a full policy: it cannot be activated
    r = httpx.post(f"{url}/admin/policies/noisy-lora/activate", headers=ADMIN, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_not_activatable"
