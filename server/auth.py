"""API keys: `/v1/*` needs a user key (when any is configured), `/admin/*` needs the admin key.

`/health`, `/ready`, `/metrics` and the OpenAPI docs stay open: probes and Prometheus scrape
without credentials, and the schema holds no data.

Checked in a pure ASGI middleware, before the body is read, so an unauthenticated client can
neither make the server parse its body nor learn anything from validation errors. Keys are
compared in constant time (`hmac.compare_digest` over SHA-256 digests, so neither the content nor
the length of a key leaks through timing, and every configured key is compared on each request).
Keys are never logged, echoed in an error, or kept in plain text on the app.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

from .errors import Forbidden, Unauthenticated, error_response, to_api_error
from .settings import Settings

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 8


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _split(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        keys += [k.strip() for k in line.split(",") if k.strip()]
    return keys


class KeyRing:
    """Digests of the user keys and of the admin key, loaded once from Settings."""

    def __init__(self, user_keys: list[str], admin_key: str | None) -> None:
        short = [k for k in user_keys if len(k) < MIN_KEY_CHARS]
        if short:
            raise ValueError(f"{len(short)} API key(s) shorter than {MIN_KEY_CHARS} characters")
        self._user = [_digest(k) for k in user_keys]
        self._admin = _digest(admin_key) if admin_key else None

    @classmethod
    def from_settings(cls, s: Settings) -> KeyRing:
        keys = _split(s.api_keys.get_secret_value()) if s.api_keys else []
        if s.api_keys_file is not None:
            path = Path(s.api_keys_file).expanduser()
            from_file = _split(path.read_text())  # a missing file fails start-up: fail closed
            if not from_file:
                raise ValueError(f"api_keys_file {path} holds no keys")
            keys += from_file
        return cls(keys, s.admin_key.get_secret_value() if s.admin_key else None)

    @property
    def user_auth(self) -> bool:
        return bool(self._user)

    @property
    def user_key_count(self) -> int:
        return len(self._user)

    @property
    def admin_enabled(self) -> bool:
        return self._admin is not None

    def is_user(self, presented: bytes) -> bool:
        found = False
        for key in self._user:  # no early exit: the time does not depend on which key matched
            found |= hmac.compare_digest(presented, key)
        return found

    def is_admin(self, presented: bytes) -> bool:
        return self._admin is not None and hmac.compare_digest(presented, self._admin)


def _bearer(scope) -> bytes | None:
    """SHA-256 of the bearer token, or None when the header is missing or not Bearer."""
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                return _digest(token)
            return None
    return None


# Outside /v1 but served to users as vLLM serves them (server/routes/tokenizer.py): same key.
USER_ROUTES = frozenset({"/tokenize", "/detokenize"})


def _check(keys: KeyRing, path: str, scope) -> None:
    """Raise Unauthenticated / Forbidden when the request may not reach `path`."""
    if path == "/admin" or path.startswith("/admin/"):
        if not keys.admin_enabled:
            raise Forbidden("the admin API is disabled: set ALIGNSERVE_ADMIN_KEY to enable it",
                            code="admin_disabled")
        token = _bearer(scope)
        if token is None:
            raise Unauthenticated("missing admin key: send `Authorization: Bearer <admin key>`",
                                  code="missing_api_key")
        if keys.is_admin(token):
            return
        if keys.is_user(token):
            raise Forbidden("this API key may not use the admin API")
        raise Unauthenticated("invalid admin key")
    if (path == "/v1" or path.startswith("/v1/") or path in USER_ROUTES) and keys.user_auth:
        token = _bearer(scope)
        if token is None:
            raise Unauthenticated("missing API key: send `Authorization: Bearer <key>`",
                                  code="missing_api_key")
        if not (keys.is_user(token) or keys.is_admin(token)):
            raise Unauthenticated("invalid API key")


class AuthGate:
    """Pure ASGI middleware applying `_check`; `on_error(api_error)` counts rejections."""

    def __init__(self, app, keys: KeyRing, on_error=None) -> None:
        self.app, self.keys, self.on_error = app, keys, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            try:
                _check(self.keys, scope.get("path", ""), scope)
            except (Unauthenticated, Forbidden) as exc:
                err = to_api_error(exc)
                if self.on_error is not None:
                    self.on_error(err)
                return await error_response(err)(scope, receive, send)
        await self.app(scope, receive, send)


def warn_if_open(keys: KeyRing, settings: Settings) -> None:
    """A server bound beyond loopback without keys serves anyone who can reach it: say so."""
    if not keys.user_auth and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API keys configured and listening on %s: /v1/* is open to anyone who "
                    "can reach it (set ALIGNSERVE_API_KEYS or ALIGNSERVE_API_KEYS_FILE)",
                    settings.host)
