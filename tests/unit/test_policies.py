"""Policy hot-swap (/admin/policies) against the fake engine: listing, auth, checkpoint
validation, and the swap itself (in-flight requests finish on the old weights, requests that
arrive during the swap queue and run on the new ones, none fails)."""

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from fakes import FakeEngine, make_app
from safetensors.numpy import save_file

from server.policy.checkpoints import CheckpointError, inspect

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "say something good"}],
        "max_tokens": 8}
ADMIN = "admin-key-0123456789abcdef"
USER = "user-key-one-123"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16,
          "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
          "tie_word_embeddings": True, "hidden_act": "silu"}


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, v, i = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    return {"model.embed_tokens.weight": (v, h), "model.layers.0.self_attn.q_proj.weight": (h, h),
            "model.layers.0.mlp.up_proj.weight": (i, h), "model.norm.weight": (h,)}


def write_checkpoint(folder: Path, config: dict | None = None, tensors: dict | None = None,
                     vocab: dict | None = None, scale: float = 1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = config or CONFIG
    (folder / "config.json").write_text(json.dumps(config))
    tensors = tensors if tensors is not None else {
        n: np.full(s, scale, dtype=np.float32) for n, s in shapes(config).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    vocab = vocab or {f"t{i}": i for i in range(config["vocab_size"])}
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}}))
    return folder


@pytest.fixture
def base(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "base")


@pytest.fixture
def tuned(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "tuned", scale=2.0)


@pytest.fixture
def engine(base) -> FakeEngine:
    e = FakeEngine(seed=3)
    e.model_path = e.weights = str(base)
    return e


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://t")


@pytest.fixture
async def app(engine):
    return make_app(engine, admin_key=ADMIN, api_keys=USER)


@pytest.fixture
async def client(app):
    async with client_for(app) as c:
        c.headers["Authorization"] = f"Bearer {USER}"
        yield c


async def until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code, err
    return err


async def active(client) -> str:
    return (await client.get("/admin/policies", headers=AUTH)).json()["active"]


# ---------------------------------------------------------------- listing and auth

async def test_base_policy_is_listed_and_active_from_the_start(client, base):
    r = await client.get("/admin/policies", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["active"] == "base" and body["swapping"] is False and body["swaps"] == 0
    [p] = body["data"]
    assert p["name"] == "base" and p["path"] == str(base) and p["active"] is True
    assert p["loaded_at"] >= p["registered_at"] > 0
    status = (await client.get("/admin/status", headers=AUTH)).json()
    assert status["policy"] == "base"
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-alignserve-policy"] == "base"
    assert (await client.get("/v1/models")).json()["data"][0]["id"] == "fake"


@pytest.mark.parametrize("method,path", [
    ("GET", "/admin/policies"), ("POST", "/admin/policies"),
    ("POST", "/admin/policies/base/activate"), ("DELETE", "/admin/policies/x")])
async def test_policy_routes_need_the_admin_key(client, engine, tuned, method, path):
    body = {"name": "tuned", "path": str(tuned)} if method == "POST" else None
    for headers, status in [({"Authorization": ""}, 401),
                            ({"Authorization": "Bearer not-the-admin-key-at-all"}, 401),
                            ({"Authorization": f"Bearer {USER}"}, 403)]:
        r = await client.request(method, path, json=body, headers=headers)
        assert r.status_code == status and r.json()["error"]["type"] in (
            "authentication_error", "permission_error")
    assert engine.reloads == []


# ---------------------------------------------------------------- validation

def _variants(tmp: Path) -> list[tuple[str, Path, str]]:
    """(case, folder, expected error code), each folder incompatible with CONFIG."""
    tmp.mkdir()
    out = [("missing", tmp / "nope", "path_not_found")]
    f = tmp / "file.safetensors"
    f.write_bytes(b"x")
    out.append(("file", f, "path_not_folder"))
    d = write_checkpoint(tmp / "noconfig")
    (d / "config.json").unlink()
    out.append(("no config", d, "missing_config"))
    d = write_checkpoint(tmp / "badjson")
    (d / "config.json").write_text("{not json")
    out.append(("bad config", d, "invalid_config"))
    d = write_checkpoint(tmp / "noweights")
    (d / "model.safetensors").unlink()
    out.append(("no weights", d, "missing_weights"))
    vocab = {**CONFIG, "vocab_size": 32}
    out.append(("vocab", write_checkpoint(tmp / "vocab", vocab), "incompatible_checkpoint"))
    hidden = {**CONFIG, "hidden_size": 16}
    out.append(("hidden", write_checkpoint(tmp / "hidden", hidden), "incompatible_checkpoint"))
    arch = {**CONFIG, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    out.append(("arch", write_checkpoint(tmp / "arch", arch), "incompatible_checkpoint"))
    t = {n: np.zeros(s, np.float32) for n, s in shapes(CONFIG).items()}
    missing = dict(t)
    del missing["model.norm.weight"]
    out.append(("missing tensor", write_checkpoint(tmp / "mt", tensors=missing),
                "incompatible_checkpoint"))
    out.append(("extra tensor", write_checkpoint(tmp / "et", tensors={
        **t, "model.layers.1.mlp.up_proj.weight": np.zeros((12, 8), np.float32)}),
        "incompatible_checkpoint"))
    out.append(("shape", write_checkpoint(tmp / "sh", tensors={
        **t, "model.norm.weight": np.zeros((9,), np.float32)}), "incompatible_checkpoint"))
    out.append(("int8", write_checkpoint(tmp / "i8", tensors={
        **t, "model.norm.weight": np.zeros((8,), np.int8)}), "unsupported_dtype"))
    d = write_checkpoint(tmp / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-10])
    out.append(("truncated", d, "invalid_weights"))
    d = write_checkpoint(tmp / "garbage")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    out.append(("garbage", d, "invalid_weights"))
    out.append(("tokenizer", write_checkpoint(tmp / "tok", vocab={f"w{i}": i for i in range(16)}),
                "incompatible_tokenizer"))
    d = tmp / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    out.append(("lora", d, "lora_disabled"))
    return out


async def test_incompatible_checkpoints_are_400_and_base_keeps_serving(client, engine, tmp_path,
                                                                       app):
    for case, folder, code in _variants(tmp_path / "bad"):
        for activate in (True, False):
            r = await client.post("/admin/policies", headers=AUTH, json={
                "name": "cand", "path": str(folder), "activate": activate})
            err = assert_error(r, 400, code)
            assert err["param"] == "path", case
            assert err["type"] == "invalid_request_error"
    assert engine.reloads == [] and engine.weights == engine.model_path
    listing = (await client.get("/admin/policies", headers=AUTH)).json()
    assert listing["active"] == "base" and [p["name"] for p in listing["data"]] == ["base"]
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-alignserve-policy"] == "base"
    metrics = (await client.get("/metrics")).text
    assert 'alignserve:policy_swaps_total{outcome="rejected"}' in metrics


async def test_bad_names_and_conflicts(client, engine, tuned, tmp_path):
    other = write_checkpoint(tmp_path / "other", scale=3.0)
    for body, status, code in [
        ({"name": "../etc", "path": str(tuned)}, 400, "invalid_value"),
        ({"name": "x", "path": str(tuned), "bogus": 1}, 400, "invalid_value"),
        ({"name": "unknown"}, 400, "missing_path"),
        ({"name": "base", "path": str(tuned)}, 409, "policy_exists"),
    ]:
        assert_error(await client.post("/admin/policies", headers=AUTH, json=body), status, code)
    r = await client.post("/admin/policies", headers=AUTH,
                          json={"name": "tuned", "path": str(tuned), "activate": False})
    assert r.status_code == 200
    r = await client.post("/admin/policies", headers=AUTH,
                          json={"name": "tuned", "path": str(other), "activate": False})
    assert_error(r, 409, "policy_exists")
    assert_error(await client.post("/admin/policies/nope/activate", headers=AUTH), 404,
                 "policy_not_found")
    assert_error(await client.delete("/admin/policies/base", headers=AUTH), 409, "policy_in_use")
    assert (await client.delete("/admin/policies/tuned", headers=AUTH)).status_code == 200
    assert engine.reloads == []


def test_checkpoint_inspection_reads_only_metadata(base):
    ckpt = inspect(base)
    assert ckpt.config["hidden_size"] == 8
    assert ckpt.tensors["model.embed_tokens.weight"] == ("F32", (16, 8))
    with pytest.raises(CheckpointError) as e:
        inspect(base / "config.json")
    assert e.value.code == "path_not_folder"


# ---------------------------------------------------------------- swapping

async def test_register_then_activate_and_swap_back(client, engine, base, tuned):
    r = await client.post("/admin/policies", headers=AUTH,
                          json={"name": "tuned", "path": str(tuned), "activate": False})
    assert r.status_code == 200 and r.json()["active"] is False and r.json()["swap"] is None
    assert engine.reloads == [] and await active(client) == "base"

    r = await client.post("/admin/policies/tuned/activate", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["active"] is True and body["swap"]["previous"] == "base"
    assert engine.weights == str(tuned) and engine.prefix_resets == 1
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.headers["x-alignserve-policy"] == "tuned"
    metrics = (await client.get("/metrics")).text
    assert 'alignserve:policy_active{policy="tuned"} 1.0' in metrics
    assert 'alignserve:policy_active{policy="base"} 0.0' in metrics
    assert 'alignserve:policy_swaps_total{outcome="ok"} 1.0' in metrics

    # back to the original weights, by POSTing the known name
    r = await client.post("/admin/policies", headers=AUTH, json={"name": "base"})
    assert r.status_code == 200 and r.json()["name"] == "base" and r.json()["active"]
    assert engine.reloads == [str(tuned), str(base)] and engine.weights == str(base)
    listing = (await client.get("/admin/policies", headers=AUTH)).json()
    assert listing["active"] == "base" and listing["swaps"] == 2
    assert {p["name"]: p["activations"] for p in listing["data"]} == {"base": 2, "tuned": 1}
    r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.headers["x-alignserve-policy"] == "base"


async def test_swap_waits_for_in_flight_requests_and_queues_new_ones(client, app, engine, tuned):
    gate = app.state.policies.gate
    engine.gate = asyncio.Event()  # holds every generation
    running = [
        asyncio.create_task(client.post("/v1/chat/completions", json={
            **CHAT, "alignment": {"strategy": "best_of_n", "n": 3}})),
        asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "stream": True})),
        asyncio.create_task(client.post("/v1/completions", json={"prompt": "a b", "stream": True})),
    ]
    await until(lambda: engine.active == 3)
    swap = asyncio.create_task(client.post("/admin/policies", headers=AUTH,
                                           json={"name": "tuned", "path": str(tuned)}))
    await until(lambda: gate.closed)
    listing = (await client.get("/admin/policies", headers=AUTH)).json()
    assert listing["swapping"] is True and listing["active"] == "base"
    started = engine.started
    queued = [asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
              for _ in range(3)]
    queued.append(asyncio.create_task(client.post("/v1/completions", json={
        "prompt": "x", "stream": True})))
    await until(lambda: gate.queued == 4)
    await asyncio.sleep(0.05)
    assert engine.started == started and engine.reloads == [] and not swap.done()

    engine.gate.set()
    r = await swap
    assert r.status_code == 200, r.text
    info = r.json()["swap"]
    assert info["drained_requests"] == 3 and info["queued_requests"] == 4
    for t in running:
        r = await t
        assert r.status_code == 200 and r.headers["x-alignserve-policy"] == "base"
        assert '"error"' not in r.text
    for t in queued:
        r = await t
        assert r.status_code == 200 and r.headers["x-alignserve-policy"] == "tuned"
        assert '"error"' not in r.text
    assert engine.mixed_weights == 0 and engine.cancelled == 0
    assert gate.held == 0 and app.state.admission.active == 0


async def test_request_past_the_drain_deadline_gets_503_and_the_swap_goes_on(engine, tuned):
    app = make_app(engine, admin_key=ADMIN, policy_drain_timeout_s=0.1, retry_after_s=2)
    async with client_for(app) as c:
        engine.gate = asyncio.Event()
        held = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
        await until(lambda: engine.active == 1)
        swap = asyncio.create_task(c.post("/admin/policies", headers=AUTH,
                                          json={"name": "tuned", "path": str(tuned)}))
        r = await held  # ended at the drain deadline, its engine work aborted
        assert_error(r, 503, "policy_swap_deadline")
        assert r.headers["retry-after"] == "2" and engine.cancelled == 1
        engine.gate.set()  # lets the canary generation through
        r = await swap
        assert r.status_code == 200, r.text
        assert engine.weights == str(tuned) and await active(c) == "tuned"
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.headers["x-alignserve-policy"] == "tuned"


async def test_swap_whose_stragglers_do_not_stop_is_cancelled(engine, tuned, monkeypatch):
    import server.policy.manager as policies

    monkeypatch.setattr(policies, "EVICT_GRACE_S", 0.05)
    app = make_app(engine, admin_key=ADMIN, policy_drain_timeout_s=0.05, retry_after_s=2)
    lease = app.state.policies.lease()  # a holder that watches nothing: it cannot be ended
    await lease.acquire()
    async with client_for(app) as c:
        r = await c.post("/admin/policies", headers=AUTH, json={"name": "tuned",
                                                                  "path": str(tuned)})
        err = assert_error(r, 503, "policy_swap_timeout")
        assert "base" in err["message"] and r.headers["retry-after"] == "2"
        assert engine.reloads == [] and not app.state.policies.gate.closed
        lease.release()
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert await active(c) == "base"
        # registered (it is valid): a later activation, once idle, succeeds
        r = await c.post("/admin/policies/tuned/activate", headers=AUTH)
        assert r.status_code == 200 and engine.weights == str(tuned)


async def test_queued_request_gets_503_only_past_the_queue_timeout(engine, tuned):
    app = make_app(engine, admin_key=ADMIN, policy_queue_timeout_s=0.1)
    async with client_for(app) as c:
        engine.reload_gate = asyncio.Event()  # a reload that takes long
        swap = asyncio.create_task(c.post("/admin/policies", headers=AUTH,
                                          json={"name": "tuned", "path": str(tuned)}))
        await until(lambda: app.state.policies.gate.closed)
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert_error(r, 503, "policy_swap_in_progress")
        assert r.headers["retry-after"] == "1"
        assert_error(await c.post("/admin/policies/base/activate", headers=AUTH), 409,
                     "policy_swap_in_progress")
        engine.reload_gate.set()
        assert (await swap).status_code == 200
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.headers["x-alignserve-policy"] == "tuned"


async def test_failed_reload_restores_the_previous_weights(client, engine, base, tuned):
    engine.reload_error = RuntimeError("shape mismatch in layer 3")
    r = await client.post("/admin/policies", headers=AUTH, json={"name": "tuned",
                                                                  "path": str(tuned)})
    err = assert_error(r, 400, "policy_load_failed")
    assert "'base' was restored" in err["message"]
    assert engine.weights == str(base) and engine.reloads == [str(base)]
    assert await active(client) == "base"
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_activation_revalidates_files_changed_on_disk(client, engine, tuned):
    r = await client.post("/admin/policies", headers=AUTH,
                          json={"name": "tuned", "path": str(tuned), "activate": False})
    assert r.status_code == 200
    shutil.rmtree(tuned)
    assert_error(await client.post("/admin/policies/tuned/activate", headers=AUTH), 400,
                 "path_not_found")
    assert engine.reloads == [] and await active(client) == "base"


# ---------------------------------------------------------------- LoRA adapters

def write_adapter(folder: Path, rank: int = 4, a_in: int = 8) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": np.ones((rank, a_in), np.float32),
               f"{prefix}.lora_B.weight": np.ones((8, rank), np.float32)},
              str(folder / "adapter_model.safetensors"))
    return folder


async def test_lora_adapters_are_registered_and_chosen_per_request(engine, tmp_path):
    engine.lora_enabled = True
    app = make_app(engine, admin_key=ADMIN, enable_lora=True, max_lora_rank=8)
    async with client_for(app) as c:
        for folder, code in [(write_adapter(tmp_path / "big", rank=16), "unsupported_adapter"),
                             (write_adapter(tmp_path / "misfit", a_in=9),
                              "incompatible_checkpoint")]:
            assert_error(await c.post("/admin/policies", headers=AUTH, json={
                "name": "bad", "path": str(folder)}), 400, code)
        adapter = write_adapter(tmp_path / "polite")
        r = await c.post("/admin/policies", headers=AUTH, json={"name": "polite",
                                                                  "path": str(adapter)})
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == "lora" and r.json()["active"] is False
        assert engine.adapters == {"polite": str(adapter)} and engine.reloads == []
        models = (await c.get("/v1/models")).json()["data"]
        assert [(m["id"], m.get("parent")) for m in models] == [("fake", None), ("polite", "fake")]

        assert (await c.post("/v1/chat/completions", json={**CHAT, "model": "polite"})
                ).status_code == 200
        assert engine.calls[-1][2].adapter == "polite"
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert engine.calls[-1][2].adapter is None
        assert_error(await c.post("/v1/chat/completions", json={**CHAT, "model": "rude"}), 404,
                     "model_not_found")
        assert_error(await c.post("/admin/policies/polite/activate", headers=AUTH), 400,
                     "adapter_not_activatable")
        # an adapter can be removed: unloaded from the engine, no longer a model
        r = await c.delete("/admin/policies/polite", headers=AUTH)
        assert r.status_code == 200, r.text
        assert "polite" not in engine.adapters
        assert_error(await c.post("/v1/chat/completions", json={**CHAT, "model": "polite"}),
                     404, "model_not_found")
        assert await active(c) == "base"
