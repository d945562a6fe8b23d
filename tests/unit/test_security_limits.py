"""API keys, the admin key, request timeouts, the token budget and Retry-After, against fakes."""

import asyncio
import json
import logging

import httpx
import pytest
from fakes import FakeEngine, make_app

from server.auth import KeyRing
from server.settings import Settings

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "say something good"}],
        "max_tokens": 8}
USER_KEYS = "user-key-one-123,user-key-two-456"
ADMIN = "admin-key-0123456789abcdef"


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://t")


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(r: httpx.Response, status: int, type_: str, code: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == type_
    if code is not None:
        assert err["code"] == code


@pytest.fixture
async def secured():
    app = make_app(api_keys=USER_KEYS, admin_key=ADMIN)
    async with client_for(app) as c:
        yield c


@pytest.mark.parametrize("headers,code", [
    ({}, "missing_api_key"),
    (bearer("wrong-key-000000"), "invalid_api_key"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
    ({"Authorization": "Bearer "}, "missing_api_key"),
    (bearer("user-key-one-12"), "invalid_api_key"),  # a prefix of a real key
])
async def test_v1_needs_a_valid_key(secured, headers, code):
    for method, path, body in [("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None),
                               ("POST", "/v1/completions", {"prompt": "hi"}),
                               ("GET", "/v1/no-such-route", None)]:
        r = await secured.request(method, path, json=body, headers=headers)
        assert_openai_error(r, 401, "authentication_error", code)
        assert r.headers["www-authenticate"] == "Bearer"


async def test_auth_runs_before_the_body_is_parsed(secured):
    r = await secured.post("/v1/chat/completions", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert_openai_error(r, 401, "authentication_error")


async def test_every_user_key_works_and_the_error_never_echoes_a_key(secured):
    for key in USER_KEYS.split(","):
        r = await secured.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
        assert r.status_code == 200, r.text
    r = await secured.post("/v1/chat/completions", json=CHAT, headers=bearer("user-key-one-124"))
    assert "user-key" not in r.text
    # lower-case scheme is accepted (RFC 6750 schemes are case-insensitive)
    r = await secured.get("/v1/models", headers={"authorization": "bearer user-key-two-456"})
    assert r.status_code == 200


async def test_probes_and_metrics_stay_open(secured):
    assert (await secured.get("/health")).status_code == 200
    assert (await secured.get("/metrics")).status_code == 200
    assert (await secured.get("/ready")).status_code == 503  # loading: no lifespan ran here
    assert (await secured.get("/openapi.json")).status_code == 200


async def test_admin_routes_need_the_admin_key(secured):
    r = await secured.get("/admin/status")
    assert_openai_error(r, 401, "authentication_error", "missing_api_key")
    r = await secured.get("/admin/status", headers=bearer("not-the-admin-key-at-all"))
    assert_openai_error(r, 401, "authentication_error", "invalid_api_key")
    r = await secured.get("/admin/status", headers=bearer("user-key-one-123"))
    assert_openai_error(r, 403, "permission_error")
    r = await secured.get("/admin/status", headers=bearer(ADMIN))
    assert r.status_code == 200
    body = r.json()
    assert body["state"] == "loading" and body["requests_in_flight"] == 0
    assert body["user_keys"] == 2 and ADMIN not in r.text and "user-key" not in r.text
    # the admin key also works on /v1
    assert (await secured.get("/v1/models", headers=bearer(ADMIN))).status_code == 200


async def test_admin_is_disabled_without_an_admin_key():
    async with client_for(make_app()) as c:
        assert (await c.get("/v1/models")).status_code == 200  # no user keys: /v1 open
        r = await c.get("/admin/status", headers=bearer(ADMIN))
        assert_openai_error(r, 403, "permission_error", "admin_disabled")


async def test_rejections_are_counted(secured):
    await secured.get("/v1/models")
    text = (await secured.get("/metrics")).text
    assert 'alignserve:errors_total{status="401",type="authentication_error"} 1.0' in text


def test_keys_file_joins_the_env_keys(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# rotated 2025-01\nfile-key-aaaa1111\nfile-key-bbbb2222, file-key-cccc3333\n")
    ring = KeyRing.from_settings(Settings(api_keys="env-key-12345678", api_keys_file=f))
    assert ring.user_key_count == 4


@pytest.mark.parametrize("kwargs,match", [
    ({"api_keys": "short"}, "shorter than 8"),
    ({"api_keys_file": "/nonexistent/keys"}, "No such file"),
])
def test_bad_key_configuration_fails_at_start_up(tmp_path, kwargs, match):
    with pytest.raises((ValueError, OSError), match=match):
        KeyRing.from_settings(Settings(**kwargs))


def test_empty_keys_file_fails_closed(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no keys"):
        KeyRing.from_settings(Settings(api_keys_file=f))


def test_secrets_never_show_in_settings_repr_or_errors():
    s = Settings(api_keys=USER_KEYS, admin_key=ADMIN)
    assert "user-key" not in repr(s) and ADMIN not in repr(s) and ADMIN not in str(s.model_dump())
    with pytest.raises(ValueError) as exc:
        Settings(admin_key="too-short-key")
    assert "too-short-key" not in str(exc.value)


async def test_keys_are_never_logged(caplog):
    caplog.set_level(logging.DEBUG)
    app = make_app(api_keys=USER_KEYS, admin_key=ADMIN, host="0.0.0.0")
    async with client_for(app) as c:
        await c.get("/v1/models", headers=bearer("user-key-one-123"))
        await c.get("/v1/models", headers=bearer("guess-guess-guess"))
    assert "user-key" not in caplog.text and ADMIN not in caplog.text
    assert "guess-guess" not in caplog.text


def test_open_server_beyond_loopback_warns(caplog):
    caplog.set_level(logging.WARNING)
    make_app(host="0.0.0.0")
    assert "no API keys configured" in caplog.text


# ------------------------------------------------------------------------------ limits


async def test_request_timeout_aborts_engine_work_and_answers_504():
    engine = FakeEngine()
    engine.gate = asyncio.Event()  # never opened: the work would run forever
    app = make_app(engine, request_timeout_s=0.2)
    async with client_for(app) as c:
        r = await c.post("/v1/chat/completions",
                         json={**CHAT, "alignment": {"strategy": "best_of_n", "n": 3}})
        assert_openai_error(r, 504, "timeout_error", "request_timeout")
        assert engine.cancelled == 1 and engine.active == 0
        text = (await c.get("/metrics")).text
        assert "alignserve:requests_in_flight 0.0" in text


async def test_stream_timeout_is_reported_in_band_and_aborts():
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    app = make_app(engine, request_timeout_s=0.2)
    async with client_for(app) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200  # headers went out with the first chunk
    lines = [l[len("data: "):] for l in r.text.splitlines() if l.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert json.loads(lines[0])["choices"][0]["delta"]["role"] == "assistant"
    err = json.loads(lines[-2])["error"]
    assert err["code"] == "request_timeout" and err["type"] == "timeout_error"
    assert engine.cancelled == 1 and engine.active == 0


async def test_fast_requests_are_not_timed_out():
    async with client_for(make_app(request_timeout_s=30)) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert '"error"' not in r.text
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200


@pytest.mark.parametrize("body,ok", [
    # 2 choices × 4 candidates × 8 tokens = 64: exactly the budget
    ({**CHAT, "n": 2, "alignment": {"strategy": "best_of_n", "n": 4}}, True),
    ({**CHAT, "n": 2, "max_tokens": 9, "alignment": {"strategy": "best_of_n", "n": 4}}, False),
    ({**CHAT, "n": 3, "alignment": {"strategy": "speculative_rejection", "n": 4}}, False),
    # plain sampling draws one sample per choice whatever alignment.n says
    ({**CHAT, "n": 4, "max_tokens": 16, "alignment": {"strategy": "none", "n": 16}}, True),
])
async def test_token_budget(body, ok):
    async with client_for(make_app(max_request_tokens=64)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    if ok:
        assert r.status_code == 200, r.text
    else:
        assert_openai_error(r, 400, "invalid_request_error", "token_budget_exceeded")
        assert r.json()["error"]["param"] == "max_tokens"


async def test_token_budget_counts_every_prompt_of_a_completion_batch():
    async with client_for(make_app(max_request_tokens=64)) as c:
        r = await c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2,
                                                  "max_tokens": 11})
    assert_openai_error(r, 400, "invalid_request_error", "token_budget_exceeded")


async def test_retry_after_comes_from_settings():
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    app = make_app(engine, max_concurrent_requests=1, retry_after_s=7)
    async with client_for(app) as c:
        first = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
        while engine.active == 0:
            await asyncio.sleep(0.01)
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert_openai_error(r, 429, "rate_limit_error", "too_many_requests")
        assert r.headers["retry-after"] == "7"
        engine.gate.set()
        assert (await first).status_code == 200
