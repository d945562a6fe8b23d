"""The playground: its static files under a strict CSP, served without a key while its /v1 calls
need one, the strategy catalogue it builds its form from, and `playground: false`.

The page itself is driven in headless Chromium on the fakes in test_playground_page.py and on
the real engine in tests/integration/test_playground_browser.py."""

from __future__ import annotations

import re

import httpx
import pytest
from fakes import make_app

from decoding.strategies import STRATEGIES
from server.routes.playground import ASSETS, CSP

KEY = "playground-key-1"


def _client(**overrides) -> httpx.AsyncClient:
    app = make_app(**overrides)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test")


async def test_page_and_assets_are_served_with_a_strict_csp():
    async with _client() as c:
        for path, (_, media) in ASSETS.items():
            r = await c.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"] == media
            assert r.headers["content-security-policy"] == CSP
            assert r.headers["x-content-type-options"] == "nosniff"
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'",
                      "connect-src 'self'", "frame-ancestors 'none'"):
        assert directive in CSP
    assert "unsafe" not in CSP


async def test_page_has_no_inline_script_or_style_and_no_outside_urls():
    async with _client() as c:
        html = (await c.get("/playground")).text
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
        assert scripts and all('src="/playground/' in attrs and not body.strip()
                                for attrs, body in scripts)
        assert "<style" not in html and " style=" not in html
        for path in ASSETS:
            text = (await c.get(path)).text
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path
            assert ".innerHTML" not in text and "eval(" not in text, path


async def test_page_needs_no_key_but_its_api_calls_do():
    async with _client(api_keys=KEY) as c:
        assert (await c.get("/playground")).status_code == 200
        assert (await c.get("/playground/app.js")).status_code == 200
        r = await c.get("/v1/alignment/strategies")
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        ok = await c.get("/v1/alignment/strategies", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200


async def test_catalogue_lists_every_strategy_with_its_own_options_schema():
    async with _client() as c:
        body = (await c.get("/v1/alignment/strategies")).json()
    names = [s["name"] for s in body["data"]]
    assert names == list(STRATEGIES)
    for entry in body["data"]:
        s = STRATEGIES[entry["name"]]
        assert entry["options"] == s.Options.model_json_schema(by_alias=True)
        assert entry["needs_objective"] == s.traits.needs_objective
        assert entry["takes_value"] == (s.traits.value_protocol is not None)
        assert entry["description"]
    spr = next(s for s in body["data"] if s["name"] == "speculative_rejection")
    assert spr["options"]["properties"]["alpha"]["exclusiveMaximum"] == 1.0
    tokenwise = next(s for s in body["data"] if s["name"] == "tokenwise_cd")
    assert "lambda" in tokenwise["options"]["properties"]  # the JSON name, not the Python one
    common = body["common"]["properties"]
    assert {"n", "reward", "cost", "cost_weight", "value", "return_candidates"} <= common.keys()
    assert body["default_reward"] == "good_count"
    assert "good_count" in body["scorers"] and not any(s.startswith("hf:") for s in body["scorers"])


async def test_catalogue_is_in_the_openapi_schema_and_the_page_is_not():
    async with _client() as c:
        paths = (await c.get("/openapi.json")).json()["paths"]
    assert "/v1/alignment/strategies" in paths
    assert not any(p.startswith("/playground") for p in paths)


@pytest.mark.parametrize("path", list(ASSETS))
async def test_playground_off_is_a_404(path):
    async with _client(playground=False) as c:
        r = await c.get(path)
        assert r.status_code == 404
        assert "playground" in r.json()["error"]["message"]
        # the API is unaffected: the catalogue stays for other clients
        assert (await c.get("/v1/alignment/strategies")).status_code == 200


def test_playground_setting_is_a_flag_and_an_env_var(monkeypatch, capsys):
    import argparse

    from cli.main import main
    from cli.serve import _add_settings_flags, settings_from_args
    from server.settings import Settings

    assert Settings().playground is True
    monkeypatch.setenv("ALIGNSERVE_PLAYGROUND", "false")
    assert Settings().playground is False
    monkeypatch.delenv("ALIGNSERVE_PLAYGROUND")
    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    assert settings_from_args(parser.parse_args(["--playground", "false"])).playground is False
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0 and "--playground" in capsys.readouterr().out
