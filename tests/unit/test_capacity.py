"""Capacity that must always come back: admission slots and policy leases of requests whose
client left at any moment (driven at the ASGI level, so the exact ordering is forced), writes
to clients that stop reading, per-client caps, and the failure paths of a policy swap (drain
deadline, SIGTERM, reload timeout, a canary that fails, restore failures, admin paths)."""

import asyncio
import json
import math
import os
from pathlib import Path

import pytest
from fakes import FakeEngine, WordReward, make_app
from test_lifecycle import client_for, until
from test_policies import ADMIN, AUTH, CHAT, assert_error, write_adapter, write_checkpoint

from server.auth import client_identity
from server.errors import APIError
from server.policy.file import PolicyFileWatcher
from server.serving import ticket

STREAM = {**CHAT, "stream": True}



class Client:
    """One ASGI request driven by hand: `gone` makes `receive` answer http.disconnect (after
    the body), `send_hook(message)` may raise or block a write."""

    def __init__(self, body: dict, path: str = "/v1/chat/completions", spec: str = "2.3",
                 send_hook=None, headers=()) -> None:
        data = json.dumps(body).encode()
        self.scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": spec},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(data)).encode()), *headers],
            "client": ("10.0.0.7", 4321), "server": ("t", 80), "state": {}}
        self.body, self.gone, self.send_hook = data, asyncio.Event(), send_hook
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if self.send_hook is not None:
            await self.send_hook(message)
        self.sent.append(message)

    async def run(self, app, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await app(self.scope, self.receive, self.send)

    @property
    def status(self) -> int | None:
        starts = [m["status"] for m in self.sent if m["type"] == "http.response.start"]
        return starts[0] if starts else None

    @property
    def text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.sent
                        if m["type"] == "http.response.body").decode()


def assert_nothing_held(app, engine: FakeEngine | None = None) -> None:
    st = app.state
    assert st.admission.active == 0 and st.admission.by_key == {}
    assert st.policies.gate.held == 0 and st.policies.gate.queued == 0
    assert st.metrics.in_flight._value.get() == 0
    if engine is not None:
        assert engine.active == 0


# ---------------------------------------------------------------- item 2: leaked slots

async def test_stream_whose_client_left_before_the_response_started_releases():
    # Starlette's disconnect listener sees http.disconnect at once and cancels the sender
    # before its first step: the body generator never starts, its `finally` never runs.
    engine = FakeEngine()
    app = make_app(engine)
    c = Client(STREAM)
    c.gone.set()
    await c.run(app)
    assert_nothing_held(app, engine)


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
async def test_stream_whose_first_write_fails_releases(spec):
    async def broken(message):
        raise OSError("connection reset by peer")

    engine = FakeEngine()
    app = make_app(engine)
    await Client(STREAM, spec=spec, send_hook=broken).run(app)
    assert_nothing_held(app, engine)


async def test_disconnect_during_tokenisation_releases(monkeypatch):
    engine = FakeEngine()
    app = make_app(engine)
    c = Client(STREAM)
    encode = engine.tokenizer.encode

    def encode_then_hang_up(*args, **kwargs):
        c.gone.set()
        return encode(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", encode_then_hang_up)
    await c.run(app)
    assert_nothing_held(app, engine)


async def test_disconnect_during_a_scorer_call_releases(monkeypatch):
    engine = FakeEngine()
    app = make_app(engine)
    c = Client({**STREAM, "alignment": {"strategy": "best_of_n", "n": 3}})
    score = WordReward.score

    def score_then_hang_up(self, prompt, responses):
        c.gone.set()
        return score(self, prompt, responses)

    monkeypatch.setattr(WordReward, "score", score_then_hang_up)
    await c.run(app)
    assert_nothing_held(app, engine)


@pytest.mark.parametrize("body", [CHAT, STREAM])
async def test_disconnect_while_queued_at_a_closed_gate_leaves_the_queue(body):
    engine = FakeEngine()
    app = make_app(engine)
    gate = app.state.policies.gate
    gate.close()  # a swap in progress
    c = Client(body)
    task = asyncio.create_task(c.run(app))
    await until(lambda: gate.queued == 1)
    c.gone.set()
    await task  # before: it waited for the gate to open, holding its slot
    assert c.status == 499 and engine.started == 0
    assert_nothing_held(app, engine)
    gate.open()


async def test_queued_request_gets_the_request_timeout_too():
    app = make_app(FakeEngine(), request_timeout_s=0.2, policy_queue_timeout_s=60)
    app.state.policies.gate.close()
    async with client_for(app) as c:
        assert_error(await c.post("/v1/chat/completions", json=CHAT), 504, "request_timeout")
    assert_nothing_held(app)


# ---------------------------------------------------------------- item 3: stalled clients

async def test_client_that_stops_reading_is_cut_at_the_request_timeout(monkeypatch):
    monkeypatch.setattr(ticket, "WRITE_GRACE_S", 0.05)
    engine = FakeEngine(full_length=True)
    engine.gate = asyncio.Event()  # the stream keeps going: only the stalled write can end it
    app = make_app(engine, request_timeout_s=0.3)
    never = asyncio.Event()

    async def stop_reading(message):
        if message["type"] == "http.response.body":
            await never.wait()  # the socket buffer is full: the write never completes

    c = Client(STREAM, send_hook=stop_reading)
    await c.run(app, timeout=5)
    assert c.status == 200
    assert_nothing_held(app, engine)


async def test_one_key_cannot_hold_every_slot():
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    keys = ["key-one-aaaaaaaa", "key-two-bbbbbbbb"]
    app = make_app(engine, api_keys=",".join(keys), max_concurrent_requests=4,
                   max_concurrent_requests_per_key=2, retry_after_s=3)
    async with client_for(app) as c:
        one = {"Authorization": f"Bearer {keys[0]}"}
        two = {"Authorization": f"Bearer {keys[1]}"}
        held = [asyncio.create_task(c.post("/v1/chat/completions", json=CHAT, headers=one))
                for _ in range(2)]
        await until(lambda: engine.active == 2)
        r = await c.post("/v1/chat/completions", json=CHAT, headers=one)
        err = assert_error(r, 429, "too_many_requests_for_key")
        assert r.headers["retry-after"] == "3" and keys[0] not in err["message"]
        held.append(asyncio.create_task(c.post("/v1/chat/completions", json=CHAT,
                                               headers=two)))
        await until(lambda: engine.active == 3)  # the other key is still admitted
        assert app.state.admission.by_key == {"key:0": 2, "key:1": 1}
        engine.gate.set()
        assert [(await t).status_code for t in held] == [200, 200, 200]
    assert_nothing_held(app, engine)


def test_client_identity_without_keys_is_the_address():
    assert client_identity({"client": ("10.1.2.3", 9)}) == "addr:10.1.2.3"
    assert client_identity({"client": None}) == "anonymous"
    assert client_identity({"client": ("x", 1), "alignserve.client": "key:3"}) == "key:3"


async def test_default_key_cap_is_half_the_slots():
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    app = make_app(engine, max_concurrent_requests=4)
    async with client_for(app) as c:
        held = [asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
                for _ in range(2)]
        await until(lambda: engine.active == 2)
        assert_error(await c.post("/v1/chat/completions", json=CHAT), 429,
                     "too_many_requests_for_key")
        engine.gate.set()
        await asyncio.gather(*held)


async def test_stream_past_the_swap_drain_deadline_ends_in_band_and_the_swap_succeeds(tmp_path):
    engine = FakeEngine(full_length=True)
    base, tuned = write_checkpoint(tmp_path / "base"), write_checkpoint(tmp_path / "t", scale=2)
    engine.model_path = engine.weights = str(base)
    engine.gate = asyncio.Event()
    app = make_app(engine, admin_key=ADMIN, policy_drain_timeout_s=0.1)
    async with client_for(app) as c:
        stream = asyncio.create_task(c.post("/v1/chat/completions", json=STREAM))
        await until(lambda: engine.active == 1)
        swap = asyncio.create_task(c.post("/admin/policies", headers=AUTH,
                                          json={"name": "tuned", "path": str(tuned)}))
        r = await stream
        assert r.status_code == 200 and "policy_swap_deadline" in r.text
        assert r.text.rstrip().endswith("data: [DONE]")
        engine.gate.set()
        assert (await swap).status_code == 200 and engine.weights == str(tuned)
    assert_nothing_held(app, engine)


async def test_sigterm_during_a_swap_answers_queued_requests_with_503(tmp_path):
    engine = FakeEngine()
    base, tuned = write_checkpoint(tmp_path / "base"), write_checkpoint(tmp_path / "t", scale=2)
    engine.model_path = engine.weights = str(base)
    engine.reload_gate = asyncio.Event()
    app = make_app(engine, admin_key=ADMIN, retry_after_s=4)
    gate = app.state.policies.gate
    async with client_for(app) as c:
        swap = asyncio.create_task(c.post("/admin/policies", headers=AUTH,
                                          json={"name": "tuned", "path": str(tuned)}))
        await until(lambda: gate.closed)
        queued = [asyncio.create_task(c.post("/v1/chat/completions", json=body))
                  for body in (CHAT, STREAM)]
        await until(lambda: gate.queued == 2)
        app.state.lifecycle.begin_drain()
        for t in queued:
            r = await t
            assert_error(r, 503, "server_shutting_down")
            assert r.headers["retry-after"] == "4"
        engine.reload_gate.set()
        assert (await swap).status_code == 200
    assert_nothing_held(app, engine)


# ---------------------------------------------------------------- item 3: policy-file backoff

class _RefusingManager:
    def __init__(self) -> None:
        self.policies, self.active, self.managed_by, self.calls = {}, "base", None, 0

    async def register(self, body, managed=False):
        self.calls += 1
        raise APIError(400, "does not fit", code="incompatible_checkpoint")


async def test_failed_policy_file_apply_backs_off(tmp_path):
    path = tmp_path / "policies.json"
    path.write_text(json.dumps({"active": "a", "policies": {"a": "/models/a"}}))
    m = _RefusingManager()
    w = PolicyFileWatcher(m, path, poll_s=2)
    assert await w.sync() is False and m.calls == 1
    st = w.status()
    assert st["failures"] == 1 and st["retry_at"] is not None and "does not fit" in st["error"]
    assert await w.sync() is False and m.calls == 1  # within the backoff: not retried
    w.retry_at = 0  # the backoff has passed
    assert await w.sync() is False and m.calls == 2
    assert w.failures == 2 and w.backoff_s() == 4
    path.write_text(json.dumps({"active": "b", "policies": {"b": "/models/b"}}))
    os.utime(path, ns=(1, 1))  # a new version is tried at once
    assert await w.sync() is False and m.calls == 3 and w.failures == 1


# ---------------------------------------------------------------- item 8: failed swaps

class Flaky(FakeEngine):
    """Reloads that fail or hang for some folders; weights that generate garbage."""

    def __init__(self) -> None:
        super().__init__(seed=5)
        self.fail: set[str] = set()
        self.hang: set[str] = set()
        self.garbage: dict[str, str] = {}  # folder -> "nan" | "flat"
        self.removed: list[str] = []

    async def reload_weights(self, path: str) -> None:
        if path in self.hang:
            await asyncio.Event().wait()
        if path in self.fail:
            raise RuntimeError(f"cannot read {path}/model.safetensors")
        await super().reload_weights(path)

    async def generate(self, prompt_ids, n, sampling):
        out = await super().generate(prompt_ids, n, sampling)
        mode = self.garbage.get(self.weights)
        for s in out:
            if mode == "nan":
                s.logprobs = [math.nan] * len(s.token_ids)
            elif mode == "flat":
                s.logprobs = [-math.log(len(self.tokenizer))] * len(s.token_ids)
        return out

    async def remove_adapter(self, name: str) -> None:
        self.adapters.pop(name)
        self.removed.append(name)


@pytest.fixture
def flaky(tmp_path) -> tuple[Flaky, Path, Path]:
    engine = Flaky()
    base, tuned = write_checkpoint(tmp_path / "base"), write_checkpoint(tmp_path / "t", scale=2)
    engine.model_path = engine.weights = str(base)
    return engine, base, tuned


@pytest.mark.parametrize("mode", ["nan", "flat"])
async def test_checkpoint_that_generates_garbage_is_rolled_back(flaky, mode):
    engine, base, tuned = flaky
    engine.garbage[str(tuned)] = mode
    app = make_app(engine, admin_key=ADMIN)
    async with client_for(app) as c:
        r = await c.post("/admin/policies", headers=AUTH, json={"name": "t", "path": str(tuned)})
        err = assert_error(r, 400, "policy_canary_failed")
        assert "'base' was restored" in err["message"]
        assert engine.weights == str(base) and engine.reloads == [str(tuned), str(base)]
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.headers["x-alignserve-policy"] == "base"
        assert (await c.get("/health")).status_code == 200


async def test_reload_that_hangs_times_out_and_restores(flaky):
    engine, base, tuned = flaky
    engine.hang.add(str(tuned))
    app = make_app(engine, admin_key=ADMIN, policy_reload_timeout_s=0.1)
    async with client_for(app) as c:
        r = await c.post("/admin/policies", headers=AUTH, json={"name": "t", "path": str(tuned)})
        assert_error(r, 504, "policy_load_timeout")
        assert engine.weights == str(base)
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_failed_restore_leaves_weights_unknown_and_refuses_until_a_swap_succeeds(flaky):
    engine, base, tuned = flaky
    engine.fail |= {str(tuned), str(base)}
    app = make_app(engine, admin_key=ADMIN, retry_after_s=5)
    app.state.lifecycle.state = "ready"
    async with client_for(app) as c:
        r = await c.post("/admin/policies", headers=AUTH, json={"name": "t", "path": str(tuned)})
        err = assert_error(r, 503, "policy_restore_failed")
        assert str(tuned) not in err["message"] and "safetensors" not in err["message"]
        assert (await c.get("/health")).status_code == 503
        assert (await c.get("/ready")).status_code == 503
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert_error(r, 503, "policy_state_unknown")
        assert r.headers["retry-after"] == "5" and engine.started == 0
        engine.fail.clear()  # the operator fixed the disk: swapping back recovers
        r = await c.post("/admin/policies/base/activate", headers=AUTH)
        assert r.status_code == 200, r.text
        assert (await c.get("/health")).status_code == 200
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert_nothing_held(app, engine)


# ---------------------------------------------------------------- item 9: admin paths

async def test_admin_paths_must_lie_inside_the_policy_root(flaky, tmp_path_factory):
    engine, base, tuned = flaky
    elsewhere = write_checkpoint(tmp_path_factory.mktemp("elsewhere") / "ck")
    link = base.parent / "link"
    link.symlink_to(elsewhere)
    shard = write_checkpoint(base.parent / "sharded")
    (shard / "model.safetensors").rename(elsewhere.parent / "stolen.safetensors")
    (shard / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "../../" + elsewhere.parent.name + "/stolen.safetensors"}}))
    app = make_app(engine, admin_key=ADMIN)
    async with client_for(app) as c:
        messages = set()
        for path in (elsewhere, link, shard, base.parent / "missing", "/etc"):
            r = await c.post("/admin/policies", headers=AUTH, json={"name": "x",
                                                                      "path": str(path)})
            err = assert_error(r, 400, "path_not_found")
            assert str(path) not in err["message"]
            messages.add(err["message"])
        assert len(messages) == 1  # outside and missing look the same
        assert engine.reloads == []
        r = await c.post("/admin/policies", headers=AUTH, json={"name": "t", "path": str(tuned)})
        assert r.status_code == 200, r.text
    # an explicit root elsewhere: the served model's neighbours are outside it now
    app = make_app(engine, admin_key=ADMIN, policy_root=elsewhere.parent)
    async with client_for(app) as c:
        r = await c.post("/admin/policies", headers=AUTH, json={"name": "t", "path": str(tuned)})
        assert_error(r, 400, "path_not_found")
        r = await c.post("/admin/policies", headers=AUTH, json={"name": "e",
                                                                  "path": str(elsewhere)})
        assert r.status_code == 200, r.text


async def test_no_root_means_no_admin_paths(tmp_path):
    engine = Flaky()
    engine.model_path = engine.weights = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id
    tuned = write_checkpoint(tmp_path / "t")
    app = make_app(engine, admin_key=ADMIN)
    async with client_for(app) as c:
        r = await c.post("/admin/policies", headers=AUTH, json={"name": "t", "path": str(tuned)})
        assert_error(r, 400, "policy_root_unset")


async def test_adapters_are_bounded_and_removable(flaky, tmp_path):
    engine, base, _ = flaky
    engine.lora_enabled = True
    app = make_app(engine, admin_key=ADMIN, enable_lora=True, max_lora_rank=8,
                   max_lora_adapters=1)
    one, two = write_adapter(tmp_path / "one"), write_adapter(tmp_path / "two")
    async with client_for(app) as c:
        assert (await c.post("/admin/policies", headers=AUTH,
                             json={"name": "one", "path": str(one)})).status_code == 200
        assert_error(await c.post("/admin/policies", headers=AUTH,
                                  json={"name": "two", "path": str(two)}), 409,
                     "too_many_adapters")
        r = await c.delete("/admin/policies/one", headers=AUTH)
        assert r.status_code == 200 and r.json()["kind"] == "lora"
        assert engine.removed == ["one"] and engine.adapters == {}
        assert_error(await c.post("/v1/chat/completions", json={**CHAT, "model": "one"}), 404,
                     "model_not_found")
        assert (await c.post("/admin/policies", headers=AUTH,
                             json={"name": "two", "path": str(two)})).status_code == 200
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "two"})
        assert r.status_code == 200 and engine.calls[-1][2].adapter == "two"
    assert_nothing_held(app, engine)


async def test_checkpoint_with_nonfinite_weights_never_reaches_the_engine(flaky, tmp_path):
    import numpy as np
    from test_policies import CONFIG, shapes

    engine, base, _ = flaky
    tensors = {n: np.ones(sh, dtype=np.float32) for n, sh in shapes(CONFIG).items()}
    tensors["model.norm.weight"][2] = np.inf
    bad = write_checkpoint(tmp_path / "bad", tensors=tensors)
    app = make_app(engine, admin_key=ADMIN)
    async with client_for(app) as c:
        r = await c.post("/admin/policies", headers=AUTH, json={"name": "b", "path": str(bad)})
        err = assert_error(r, 400, "nonfinite_weights")
        assert "model.norm.weight" in err["message"] and engine.reloads == []
        assert not app.state.policies.gate.closed
