"""No API open by accident (issue 25, item 10): a server bound beyond loopback without user keys
refuses to start unless told to; the example Secret's placeholders are refused; the admin key
can come from a file; /version needs a key where keys exist; the admin API stays out of the
public OpenAPI document."""

import httpx
import pytest
from fakes import make_app

from cli.main import main as cli_main
from server.auth import KeyRing, check_open
from server.settings import Settings


@pytest.mark.parametrize("host, keys, allow, refused", [
    ("0.0.0.0", None, False, True),
    ("0.0.0.0", None, True, False),
    ("0.0.0.0", "user-key-0123456789abcdef0123456789", False, False),  # 32+ characters
    ("127.0.0.1", None, False, False),
    ("::1", None, False, False),
])
def test_an_open_api_beyond_loopback_needs_consent(host, keys, allow, refused):
    s = Settings(host=host, api_keys=keys, allow_unauthenticated=allow)
    if refused:
        with pytest.raises(ValueError, match="allow-unauthenticated"):
            check_open(KeyRing.from_settings(s), s)
    else:
        check_open(KeyRing.from_settings(s), s)


def test_the_cli_refuses_in_one_line_before_the_engine_starts(capsys):
    assert cli_main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--allow-unauthenticated" in err


@pytest.mark.parametrize("field, value", [
    ("api_keys", "replace-with-a-long-random-key"),
    ("admin_key", "replace-with-a-long-random-admin-key"),
])
def test_the_example_secrets_placeholders_are_refused(field, value):
    with pytest.raises(ValueError, match="placeholder"):
        KeyRing.from_settings(Settings(**{field: value}))


def test_the_admin_key_can_come_from_a_file(tmp_path):
    f = tmp_path / "admin-key"
    f.write_text("admin-key-from-a-file-0123\n")
    keys = KeyRing.from_settings(Settings(admin_key_file=f))
    assert keys.admin_enabled
    with pytest.raises(ValueError, match="not both"):
        KeyRing.from_settings(Settings(admin_key_file=f, admin_key="another-admin-key-0123"))
    f.write_text("short")
    with pytest.raises(ValueError, match="16"):
        KeyRing.from_settings(Settings(admin_key_file=f))


async def test_version_needs_a_key_and_admin_routes_stay_out_of_the_openapi_document():
    app = make_app(api_keys="user-key-0123456789", admin_key="admin-key-0123456789abcdef")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        assert (await c.get("/version")).status_code == 401
        ok = await c.get("/version", headers={"Authorization": "Bearer user-key-0123456789"})
        assert ok.status_code == 200
        paths = (await c.get("/openapi.json")).json()["paths"]
    assert not [p for p in paths if p.startswith("/admin") or "lora_adapter" in p]
