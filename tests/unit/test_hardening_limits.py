"""Issue 25 leftovers, against fakes: /tokenize and /detokenize admitted and capped in size, the
remote scorers' circuit-breaker thresholds as settings, /metrics behind an optional token (and
its leak gauges), and 32-character keys beyond loopback."""

import argparse
import logging

import httpx
import pytest
from fakes import make_app

from cli.main import main as cli_main
from cli.serve import _add_settings_flags, settings_from_args
from runtime import remote_scorer as rs
from runtime.circuit import BreakerConfig
from server.auth import MIN_PUBLIC_KEY_CHARS, KeyRing, check_open
from server.settings import Settings

METRICS_TOKEN = "metrics-token-0123456789"
LONG_KEY = "k" * MIN_PUBLIC_KEY_CHARS


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://t")


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


# ------------------------------------------------------------------------------ a) /tokenize


async def test_tokenize_takes_an_admission_slot_and_gives_it_back():
    app = make_app(max_concurrent_requests=1)
    admission = app.state.admission
    async with client_for(app) as c:
        with admission.slot():  # the server's one slot is busy
            r = await c.post("/tokenize", json={"prompt": "say something good"})
            assert_error(r, 429)
            assert r.headers["retry-after"] == "1"
            r = await c.post("/detokenize", json={"tokens": [1, 2]})
            assert_error(r, 429)
        ok = await c.post("/tokenize", json={"prompt": "say something good"})
        assert ok.status_code == 200 and ok.json()["count"] > 0
        assert (await c.post("/detokenize", json={"tokens": ok.json()["tokens"]})).status_code == 200
    assert admission.active == 0 and admission.by_key == {}


async def test_tokenize_counts_against_the_clients_own_cap():
    app = make_app(max_concurrent_requests=8, max_concurrent_requests_per_key=1)
    async with client_for(app) as c:
        with app.state.admission.slot("addr:127.0.0.1", 1):  # this client's one slot is held
            err = assert_error(await c.post("/tokenize", json={"prompt": "hi"}), 429)
            assert err["code"] == "too_many_requests_for_key"


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "x" * 41}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x" * 25}] * 2}, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}] * 4}, "messages"),
    ("/detokenize", {"tokens": [1] * 6}, "tokens"),
])
async def test_tokenize_input_is_capped_with_a_400_naming_the_field(path, body, param):
    app = make_app(tokenize_max_chars=40, tokenize_max_messages=3, detokenize_max_tokens=5)
    async with client_for(app) as c:
        err = assert_error(await c.post(path, json=body), 400, param)
        assert err["code"] == "input_too_large" and err["type"] == "invalid_request_error"
        # just under the caps: served
        ok = {"/tokenize": {"prompt": "x" * 40}, "/detokenize": {"tokens": [1] * 5}}[path]
        assert (await c.post(path, json=ok)).status_code == 200
    assert app.state.admission.active == 0


# ------------------------------------------------------------------------------ b) breaker


def test_breaker_thresholds_are_settings_with_bounds_and_flags():
    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    s = settings_from_args(parser.parse_args([
        "--remote-scorer-breaker-failures", "2", "--remote-scorer-breaker-open-s", "7.5",
        "--remote-scorer-breaker-probes", "3"]))
    assert s.remote_scorer_breaker() == BreakerConfig(2, 7.5, 3)
    assert Settings().remote_scorer_breaker() == BreakerConfig(5, 30.0, 1)  # the old defaults
    for bad in ({"remote_scorer_breaker_failures": 0}, {"remote_scorer_breaker_open_s": -1},
                {"remote_scorer_breaker_probes": 0}):
        with pytest.raises(ValueError):
            Settings(**bad)


def test_the_failure_threshold_setting_changes_when_the_breaker_opens():
    now = [0.0]
    default = Settings().remote_scorer_breaker().build(lambda: now[0])
    tight = Settings(remote_scorer_breaker_failures=2).remote_scorer_breaker().build(
        lambda: now[0])
    for b in (default, tight):
        b.failure(), b.failure()
    assert default.state == "closed" and default.allow()
    assert tight.state == "open" and not tight.allow()


def test_open_seconds_and_probes_settings_change_the_half_open_phase():
    now = [0.0]
    b = Settings(remote_scorer_breaker_failures=1, remote_scorer_breaker_open_s=10,
                 remote_scorer_breaker_probes=2).remote_scorer_breaker().build(lambda: now[0])
    b.failure()
    now[0] = 9.9
    assert not b.allow()  # still open
    now[0] = 10.0
    assert b.allow() and b.allow() and not b.allow()  # two probes, the third refused
    b.success()
    assert b.state == "half_open"  # one probe passed: not closed yet
    b.success()
    assert b.state == "closed" and b.allow()
    b.failure()  # threshold 1: open again; a failed probe reopens as well
    now[0] = 20.0
    assert b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()


def test_connect_remote_scorers_passes_the_thresholds_through(monkeypatch):
    monkeypatch.setattr(rs.RemoteScorer, "connect", lambda self: self)
    [scorer] = rs.connect_remote_scorers({"rm": "http://rm:8000"}, 1.0, 0,
                                         breaker=BreakerConfig(3, 7.0, 2))
    try:
        b = scorer.breaker
        assert (b.threshold, b.cooldown_s, b.probes) == (3, 7.0, 2)
    finally:
        scorer.close()


# ------------------------------------------------------------------------------ c) /metrics


async def test_metrics_stay_open_by_default_and_show_the_leak_gauges():
    async with client_for(make_app()) as c:
        chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4}
        assert (await c.post("/v1/chat/completions", json=chat)).status_code == 200
        r = await c.get("/metrics")
    assert r.status_code == 200
    for gauge in ("alignserve:admission_slots_held", "alignserve:policy_leases_held",
                  "alignserve:policy_gate_queued", "alignserve:requests_in_flight"):
        assert f"{gauge} 0.0" in r.text


@pytest.mark.parametrize("source", ["value", "file"])
async def test_a_metrics_token_protects_metrics_only(tmp_path, source):
    if source == "value":
        app = make_app(metrics_token=METRICS_TOKEN, admin_key="admin-key-0123456789abcdef")
    else:
        f = tmp_path / "metrics-token"
        f.write_text(METRICS_TOKEN + "\n")
        app = make_app(metrics_token_file=f, admin_key="admin-key-0123456789abcdef")
    async with client_for(app) as c:
        err = assert_error(await c.get("/metrics"), 401)
        assert err["type"] == "authentication_error" and err["code"] == "missing_api_key"
        wrong = await c.get("/metrics", headers={"Authorization": "Bearer not-the-token-00000"})
        assert assert_error(wrong, 401)["code"] == "invalid_api_key"
        assert METRICS_TOKEN not in wrong.text
        ok = await c.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert ok.status_code == 200 and "alignserve:requests_in_flight" in ok.text
        admin = await c.get("/metrics", headers={
            "Authorization": "Bearer admin-key-0123456789abcdef"})
        assert admin.status_code == 200
        assert (await c.get("/health")).status_code == 200  # probes stay open
        # the metrics token is no user key
        r = await c.get("/v1/models", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert r.status_code == 200  # this server has no user keys: /v1 is open anyway


def test_metrics_token_configuration_errors(tmp_path):
    with pytest.raises(ValueError):
        Settings(metrics_token="short")
    f = tmp_path / "t"
    f.write_text("short")
    with pytest.raises(ValueError, match="16"):
        KeyRing.from_settings(Settings(metrics_token_file=f))
    f.write_text(METRICS_TOKEN)
    with pytest.raises(ValueError, match="not both"):
        KeyRing.from_settings(Settings(metrics_token_file=f, metrics_token=METRICS_TOKEN))


# ------------------------------------------------------------------------------ d) key length


@pytest.mark.parametrize("host, keys, refused", [
    ("0.0.0.0", "user-key-0123456789", True),
    ("0.0.0.0", f"{LONG_KEY},user-key-0123456789", True),  # one short key is enough
    ("0.0.0.0", LONG_KEY, False),
    ("10.1.2.3", LONG_KEY[:-1], True),
    ("127.0.0.1", "user-key-0123456789", False),
    ("localhost", "user-key-0123456789", False),
])
def test_keys_beyond_loopback_need_32_characters(host, keys, refused):
    s = Settings(host=host, api_keys=keys)
    if refused:
        with pytest.raises(ValueError, match="api_keys.*32") as exc:
            check_open(KeyRing.from_settings(s), s)
        assert "user-key" not in str(exc.value) and LONG_KEY[:-1] not in str(exc.value)
    else:
        check_open(KeyRing.from_settings(s), s)


def test_short_keys_from_a_file_are_refused_too(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"{LONG_KEY}\nuser-key-0123456789\n")
    s = Settings(host="0.0.0.0", api_keys_file=f)
    with pytest.raises(ValueError, match="1 API key"):
        check_open(KeyRing.from_settings(s), s)


def test_the_cli_refuses_short_keys_beyond_loopback_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("ALIGNSERVE_API_KEYS", "user-key-0123456789")
    assert cli_main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "api_keys" in err and "32" in err
    assert "user-key-0123456789" not in err


def test_a_short_key_on_loopback_logs_one_warning(caplog):
    caplog.set_level(logging.WARNING)
    make_app(api_keys="user-key-0123456789,user-key-abcdefghij")
    lines = [r for r in caplog.records if "shorter than 32" in r.getMessage()]
    assert len(lines) == 1 and "2 API key(s)" in lines[0].getMessage()
    assert "user-key" not in caplog.text
    caplog.clear()
    make_app(api_keys=LONG_KEY)
    assert "shorter than" not in caplog.text
