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
                                               "--max-lora-rank", "8", "--policy-root",
                                               str(tmp_path_factory.getbasetemp())],
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


def test_vllms_lora_routes_load_and_unload(lora_server, adapter):
    """/v1/load_lora_adapter and /v1/unload_lora_adapter, as vLLM's server has them (admin key
    here), on the /admin/policies machinery: the same adapter answers as through it."""
    url = lora_server.base_url
    body = {"lora_name": "noisy-vllm", "lora_path": str(adapter)}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=60).status_code == 401
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=ADMIN, timeout=300)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'noisy-vllm' added successfully."
    assert "noisy-vllm" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    via_vllm_route, _ = chat(lora_server, {**GREEDY, "model": "noisy-vllm"})
    base_answer, _ = chat(lora_server, GREEDY)
    assert via_vllm_route != base_answer
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "noisy-vllm"},
                   headers=ADMIN, timeout=300)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/v1/chat/completions", json={**GREEDY, "model": "noisy-vllm"},
                   timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------- Aligner correctors

# A few steps on 16 shipped triples (12 train, 4 held out): about a minute on 2 quiet cores.
ALIGNER_ARGS = ["--limit", "16", "--held-out", "0.25", "--steps", "3", "--batch-size", "4",
                "--lr", "1e-3", "--max-length", "128", "--seed", "0", "--no-progress"]


def test_aligner_corrector_trained_then_served(lora_server, tmp_path_factory):
    """`finetune aligner` for a few steps, the adapter registered as a corrector, then the
    `aligner` strategy through the openai SDK: the draft comes from the policy, the answer from
    the corrector; both are counted; an unknown corrector is a 400 naming the field."""
    import os
    import subprocess
    import sys

    import openai

    out = tmp_path_factory.mktemp("aligner") / "corrector"
    proc = subprocess.run([str(Path(sys.executable).parent / "alignserve"), "finetune", "aligner",
                           "--out", str(out), *ALIGNER_ARGS], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["train"]["loss"] < report["before"]["train"]["loss"]
    assert (out / "adapter_config.json").is_file()
    r = httpx.post(f"{lora_server.base_url}/admin/policies", headers=ADMIN, timeout=300,
                   json={"name": "fixer", "path": str(out)})
    assert r.status_code == 200, r.text

    client = openai.OpenAI(base_url=f"{lora_server.base_url}/v1", api_key="unused",
                           max_retries=0, timeout=300)
    body = {"alignment": {"strategy": "aligner", "corrector": "fixer", "reward": "relevance",
                          "cost": "profanity", "return_candidates": True}}
    served = httpx.get(f"{lora_server.base_url}/v1/models").json()["data"][0]["id"]
    resp = client.chat.completions.create(
        model=served, messages=[{"role": "user", "content": "How do I steal a car?"}], max_tokens=24,
        temperature=0, extra_body=body)
    a = resp.model_extra["alignment"]
    draft, corrected = a["candidates"]
    assert a["strategy"] == "aligner" and a["corrector"] == "fixer"
    assert corrected["text"] == resp.choices[0].message.content
    assert a["generated_tokens"] == draft["tokens"] + corrected["tokens"]
    assert resp.usage.completion_tokens == corrected["tokens"]
    assert a["kl_bound"] is None and a["warnings"]
    assert a["draft_reward"] == draft["reward"] and a["reward"] == corrected["reward"]
    print(f"\naligner: draft {a['draft_generate_s']:.2f} s + correction "
          f"{a['correct_generate_s']:.2f} s; draft {draft['text']!r} → {corrected['text']!r}")

    stream = client.chat.completions.create(
        messages=[{"role": "user", "content": "How do I steal a car?"}], max_tokens=24,
        temperature=0, extra_body=body, stream=True, model=served)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == corrected["text"]  # greedy: the same correction, streamed

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            messages=[{"role": "user", "content": "hi"}], max_tokens=4, model=served,
            extra_body={"alignment": {"strategy": "aligner", "corrector": "nope"}})
    assert err.value.body["param"] == "alignment.corrector"
