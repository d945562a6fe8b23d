"""vLLM's runtime LoRA routes (server/routes/lora.py) on the fakes: same bodies and answers as
vLLM's server, the admin key required, paths confined to policy_root, adapters only."""

import httpx
from fakes import FakeEngine, make_app
from test_policies import ADMIN, AUTH, write_adapter, write_checkpoint

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test")


def _app(tmp_path, **kw):
    engine = FakeEngine()
    engine.model_path = engine.weights = str(write_checkpoint(tmp_path / "base"))
    engine.lora_enabled = True
    return engine, make_app(engine, admin_key=ADMIN, enable_lora=True, max_lora_rank=8,
                            policy_root=str(tmp_path), **kw)


async def test_load_serve_and_unload_an_adapter_as_vllm_does(tmp_path):
    engine, app = _app(tmp_path)
    adapter = write_adapter(tmp_path / "polite")
    async with _client(app) as c:
        r = await c.post("/v1/load_lora_adapter", headers=AUTH,
                         json={"lora_name": "polite", "lora_path": str(adapter)})
        assert r.status_code == 200, r.text
        assert r.text == "Success: LoRA adapter 'polite' added successfully."
        assert engine.adapters == {"polite": str(adapter)}
        models = {m["id"]: m for m in (await c.get("/v1/models")).json()["data"]}
        assert models["polite"]["parent"] == "fake"
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "polite"})
        assert r.status_code == 200 and engine.calls[-1][2].adapter == "polite"
        again = await c.post("/v1/load_lora_adapter", headers=AUTH,
                             json={"lora_name": "polite", "lora_path": str(adapter)})
        assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
        r = await c.post("/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "polite"})
        assert r.status_code == 200, r.text
        assert r.text == "Success: LoRA adapter 'polite' removed successfully."
        assert engine.adapters == {}
        r = await c.post("/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "polite"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "lora_not_found"


async def test_the_routes_need_the_admin_key(tmp_path):
    _, app = _app(tmp_path, api_keys="user-key-0123456789")
    adapter = write_adapter(tmp_path / "polite")
    body = {"lora_name": "polite", "lora_path": str(adapter)}
    async with _client(app) as c:
        assert (await c.post("/v1/load_lora_adapter", json=body)).status_code == 401
        user = {"Authorization": "Bearer user-key-0123456789"}
        r = await c.post("/v1/load_lora_adapter", json=body, headers=user)
        assert r.status_code in (401, 403)
        assert (await c.post("/v1/unload_lora_adapter", json={"lora_name": "x"},
                             headers=user)).status_code in (401, 403)


async def test_paths_outside_the_root_and_full_checkpoints_are_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    _, app = _app(root)
    outside = write_adapter(tmp_path / "outside")
    full = root / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    async with _client(app) as c:
        r = await c.post("/v1/load_lora_adapter", headers=AUTH,
                         json={"lora_name": "x", "lora_path": str(outside)})
        assert r.status_code == 400 and str(outside) not in r.text
        assert r.json()["error"]["param"] == "lora_path"
        r = await c.post("/v1/load_lora_adapter", headers=AUTH,
                         json={"lora_name": "x", "lora_path": str(full)})
        assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
        r = await c.post("/v1/load_lora_adapter", headers=AUTH, json={
            "lora_name": "x", "lora_path": str(full), "load_inplace": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "load_inplace"
