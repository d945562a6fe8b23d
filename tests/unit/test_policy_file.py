"""Fleet-wide policies (server/policy/file.py) with fake engines: two replicas on one policy file
swap together under streaming load with no failed request; a replica started afterwards is on
the new policy before it reports ready; bad changes keep the old policy and say why."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fakes import FakeEngine, make_app
from pydantic import ValidationError
from test_policies import ADMIN, AUTH, CHAT, client_for, until, write_checkpoint

from server.policy.file import parse_policy_file
from server.settings import Settings


@pytest.fixture
def base(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "base")


@pytest.fixture
def tuned(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "tuned", scale=2.0)


def write(path: Path, active: str, **policies: Path) -> Path:
    path.write_text(json.dumps({"active": active,
                                "policies": {k: str(v) for k, v in policies.items()}}))
    return path


def replica(base: Path, policy_file: Path):
    engine = FakeEngine(seed=3)
    engine.model_path = engine.weights = str(base)
    app = make_app(engine, admin_key=ADMIN, policy_file=policy_file, policy_file_poll_s=0.05)
    return app, engine


def test_policy_file_shape_is_checked_at_start_up(tmp_path, tuned):
    assert parse_policy_file(json.dumps({"active": "base", "policies": {}})).active == "base"
    for bad in ('{"active": "x", "policies": {}}', '{"policies": {}}', "[]", "nope",
                '{"active": "base", "policies": {"base": "/x"}}',
                '{"active": "a", "policies": {"a": 3}}', '{"active": "base", "extra": 1}'):
        with pytest.raises(ValueError):
            parse_policy_file(bad)
    with pytest.raises(ValidationError, match="policy_file"):
        Settings(policy_file=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"active": "gone", "policies": {}}')
    with pytest.raises(ValidationError, match="active"):
        Settings(policy_file=bad)
    a = parse_policy_file(json.dumps({"active": "t", "policies": {"t": str(tuned)}}))
    b = parse_policy_file(json.dumps({"active": "base", "policies": {"t": str(tuned)}}))
    assert a.generation != b.generation and len(a.generation) == 12


async def test_two_replicas_swap_together_under_streaming_load(tmp_path, base, tuned):
    pf = write(tmp_path / "policies.json", "base", tuned=tuned)
    (app1, e1), (app2, e2) = replica(base, pf), replica(base, pf)
    apps, engines = [app1, app2], [e1, e2]
    for app in apps:
        assert await app.state.policy_file.sync()  # start-up: generation 1 (base)
    first = app1.state.policy_file.applied.generation
    async with client_for(app1) as c1, client_for(app2) as c2:
        clients = [c1, c2]
        for e in engines:
            e.gate = asyncio.Event()  # hold generation: requests are mid-stream at the change
        running = [asyncio.create_task(c.post("/v1/chat/completions",
                                              json={**CHAT, "stream": True, **alignment}))
                   for c in clients for alignment in ({}, {"alignment": {
                       "strategy": "best_of_n", "n": 3}})]
        await until(lambda: all(e.active >= 2 for e in engines))
        write(pf, "tuned", tuned=tuned)
        swaps = [asyncio.create_task(app.state.policy_file.sync()) for app in apps]
        await until(lambda: all(app.state.policies.gate.closed for app in apps))
        queued = [asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT,
                                                                            "stream": True}))
                  for c in clients]
        await until(lambda: all(app.state.policies.gate.queued == 1 for app in apps))
        for e in engines:
            e.gate.set()
        assert all(await asyncio.gather(*swaps))
        for t in running:
            r = await t
            assert r.status_code == 200 and r.headers["x-alignserve-policy"] == "base"
            assert '"error"' not in r.text and "[DONE]" in r.text
        for t in queued:
            r = await t
            assert r.status_code == 200 and r.headers["x-alignserve-policy"] == "tuned"
            assert '"error"' not in r.text
        for e, c in zip(engines, clients):
            assert e.mixed_weights == 0 and e.weights == str(tuned)
            status = (await c.get("/admin/status", headers=AUTH)).json()
            assert status["policy"] == "tuned"
            assert status["policy_file"]["generation"] not in (None, first)
            assert status["policy_file"]["error"] is None
            # the admin API does not activate behind the file's back (pod-local)
            r = await c.post("/admin/policies/base/activate", headers=AUTH)
            assert r.status_code == 409 and r.json()["error"]["code"] == "policy_file_managed"
        assert (app1.state.policy_file.applied.generation
                == app2.state.policy_file.applied.generation)

    # A replica that starts now serves the new policy before it reports ready.
    app3, e3 = replica(base, pf)
    async with app3.router.lifespan_context(app3):
        await until(lambda: app3.state.lifecycle.state == "ready")
        assert e3.reloads == [str(tuned)] and app3.state.policies.active == "tuned"
        # warm-up ran after the swap: the first generation was already on the new weights
        assert e3.mixed_weights == 0


async def test_a_bad_change_keeps_the_policy_and_is_retried(tmp_path, base, tuned):
    pf = write(tmp_path / "policies.json", "base", tuned=tuned)
    app, engine = replica(base, pf)
    watcher = app.state.policy_file
    assert await watcher.sync()
    broken = write_checkpoint(tmp_path / "broken", config={
        **json.loads((tuned / "config.json").read_text()), "hidden_size": 16})
    write(pf, "broken", tuned=tuned, broken=broken)
    assert not await watcher.sync()
    assert app.state.policies.active == "base" and "broken" in watcher.error
    assert watcher.status()["generation"] == watcher.applied.generation  # still the old one
    write(pf, "tuned", tuned=tuned)  # fixed: applied at the next poll
    assert await watcher.sync() and app.state.policies.active == "tuned"
    assert watcher.error is None and engine.weights == str(tuned)
    pf.write_text("{broken json")  # an unreadable file changes nothing
    assert await watcher.sync() and app.state.policies.active == "tuned"
    assert "cannot read" in watcher.error


async def test_start_up_waits_for_the_file_policy(tmp_path, base, tuned):
    pf = write(tmp_path / "policies.json", "tuned", tuned=tuned)
    app, engine = replica(base, pf)
    engine.reload_gate = asyncio.Event()  # the reload takes a while
    async with app.router.lifespan_context(app):
        await until(lambda: app.state.policies.gate.closed)
        assert app.state.lifecycle.state == "loading"  # not ready on the old weights
        engine.reload_gate.set()
        await until(lambda: app.state.lifecycle.state == "ready")
        assert app.state.policies.active == "tuned"
