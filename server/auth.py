"""API keys: `/v1/*` needs a user key (when any is configured), `/admin/*` needs the admin key.

`/health`, `/ready` and the OpenAPI docs stay open: probes scrape without credentials, and the
schema holds no data. `/metrics` is open too unless a metrics token is set (`metrics_token` /
`metrics_token_file`): then it needs that token (or the admin key) as a bearer token.

Key length: user keys need 8+ characters, and 32+ (`MIN_PUBLIC_KEY_CHARS`) on a server bound
beyond loopback, which refuses to start otherwise (`check_open`); on loopback a short key is
only warned about (test fixtures use short keys there).

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
MIN_PUBLIC_KEY_CHARS = 32  # beyond loopback: a key a client cannot guess (issue 25, item 10)
MIN_METRICS_TOKEN_CHARS = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _split(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        keys += [k.strip() for k in line.split(",") if k.strip()]
    return keys


# The example Secret's values (deploy/base/secret.example.yaml): applied unchanged, they would
# be keys anyone can read in this repository.
PLACEHOLDER_KEYS = frozenset({"replace-with-a-long-random-key",
                              "replace-with-a-long-random-admin-key"})
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class KeyRing:
    """Digests of the user keys and of the admin key, loaded once from Settings."""

    def __init__(self, user_keys: list[str], admin_key: str | None,
                 metrics_token: str | None = None) -> None:
        short = [k for k in user_keys if len(k) < MIN_KEY_CHARS]
        if short:
            raise ValueError(f"{len(short)} API key(s) shorter than {MIN_KEY_CHARS} characters")
        if PLACEHOLDER_KEYS & {*user_keys, admin_key, metrics_token}:
            raise ValueError("a key is the example Secret's placeholder (deploy/base/"
                             "secret.example.yaml): generate one, e.g. `openssl rand -hex 32`")
        self._user = [_digest(k) for k in user_keys]
        self._admin = _digest(admin_key) if admin_key else None
        self._metrics = _digest(metrics_token) if metrics_token else None
        # how many keys are too short for a server beyond loopback (the keys are not kept)
        self.short_user_keys = sum(len(k) < MIN_PUBLIC_KEY_CHARS for k in user_keys)

    @classmethod
    def from_settings(cls, s: Settings) -> KeyRing:
        keys = _split(s.api_keys.get_secret_value()) if s.api_keys else []
        if s.api_keys_file is not None:
            path = Path(s.api_keys_file).expanduser()
            from_file = _split(path.read_text())  # a missing file fails start-up: fail closed
            if not from_file:
                raise ValueError(f"api_keys_file {path} holds no keys")
            keys += from_file
        admin = s.admin_key.get_secret_value() if s.admin_key else None
        if s.admin_key_file is not None:  # a mounted Secret file: no key in the environment
            if admin is not None:
                raise ValueError("give admin_key or admin_key_file, not both")
            admin = Path(s.admin_key_file).expanduser().read_text().strip()
            if len(admin) < 16:
                raise ValueError(f"admin_key_file {s.admin_key_file}: the admin key needs 16+ "
                                 "characters")
        return cls(keys, admin, _metrics_token(s))

    @property
    def metrics_protected(self) -> bool:
        return self._metrics is not None

    def is_metrics(self, presented: bytes) -> bool:
        """The metrics token, or the admin key (an operator may read metrics too)."""
        ok = self._metrics is not None and hmac.compare_digest(presented, self._metrics)
        return ok or self.is_admin(presented)

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
        return self.user_index(presented) is not None

    def user_index(self, presented: bytes) -> int | None:
        """Which user key matched (its position), or None."""
        found = None
        for i, key in enumerate(self._user):  # no early exit: the time does not depend on
            if hmac.compare_digest(presented, key):  # which key matched
                found = i
        return found

    def is_admin(self, presented: bytes) -> bool:
        return self._admin is not None and hmac.compare_digest(presented, self._admin)


def _metrics_token(s: Settings) -> str | None:
    token = s.metrics_token.get_secret_value() if s.metrics_token else None
    if s.metrics_token_file is not None:
        if token is not None:
            raise ValueError("give metrics_token or metrics_token_file, not both")
        token = Path(s.metrics_token_file).expanduser().read_text().strip()
        if len(token) < MIN_METRICS_TOKEN_CHARS:
            raise ValueError(f"metrics_token_file {s.metrics_token_file}: the metrics token "
                             f"needs {MIN_METRICS_TOKEN_CHARS}+ characters")
    return token


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


# Outside /v1 but served to users as vLLM serves them (server/routes/tokenizer.py): same key;
# /version too, which names the vLLM build (a fingerprint for anyone scanning).
USER_ROUTES = frozenset({"/tokenize", "/detokenize", "/version"})
# Inside /v1 as vLLM serves them, but they change what is served: the admin key
# (server/routes/lora.py).
ADMIN_ROUTES = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


# Where `AuthGate` leaves the caller's identity in the ASGI scope (read by `client_identity`).
CLIENT_SCOPE_KEY = "alignserve.client"


def client_identity(scope) -> str:
    """Who a request counts as for the per-client concurrency cap (server/serving/admission.py):
    `key:<n>` for the n-th configured user key (never the key or its digest), `admin` for the
    admin key; without a key (a server with no user keys), the client's address `addr:<ip>`
    (behind a proxy that is the proxy's address: every anonymous client shares one bucket)."""
    found = scope.get(CLIENT_SCOPE_KEY)
    if found is not None:
        return found
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "anonymous"


def _check(keys: KeyRing, path: str, scope) -> None:
    """Raise Unauthenticated / Forbidden when the request may not reach `path`; on success
    record who the caller is (`client_identity`)."""
    if path == "/metrics" and keys.metrics_protected:
        token = _bearer(scope)
        if token is None:
            raise Unauthenticated("missing metrics token: send `Authorization: Bearer <metrics "
                                  "token>`", code="missing_api_key")
        if not keys.is_metrics(token):
            raise Unauthenticated("invalid metrics token")
        return
    if path == "/admin" or path.startswith("/admin/") or path in ADMIN_ROUTES:
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
        index = keys.user_index(token)
        if index is not None:
            scope[CLIENT_SCOPE_KEY] = f"key:{index}"
        elif keys.is_admin(token):
            scope[CLIENT_SCOPE_KEY] = "admin"
        else:
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


def check_open(keys: KeyRing, settings: Settings) -> None:
    """A server bound beyond loopback without user keys would serve anyone who can reach it:
    refused at start-up unless the operator says so (`--allow-unauthenticated`). Beyond
    loopback every user key needs MIN_PUBLIC_KEY_CHARS characters (refused otherwise: the CLI
    prints one line naming api_keys and exits 2)."""
    public = settings.host not in LOOPBACK
    if not keys.user_auth and public and not settings.allow_unauthenticated:
        raise ValueError(f"no API keys and listening on {settings.host}: /v1 would be open to "
                         "anyone who can reach it; set api_keys / api_keys_file, bind "
                         "127.0.0.1, or pass --allow-unauthenticated true")
    if keys.short_user_keys and public:
        raise ValueError(f"{keys.short_user_keys} API key(s) (api_keys / api_keys_file) shorter "
                         f"than {MIN_PUBLIC_KEY_CHARS} characters while listening on "
                         f"{settings.host}; generate keys with `openssl rand -hex 32`")


def warn_if_open(keys: KeyRing, settings: Settings) -> None:
    """A server bound beyond loopback without keys serves anyone who can reach it: say so. Short
    keys (refused beyond loopback by `check_open`) get one warning."""
    if not keys.user_auth and settings.host not in LOOPBACK:
        log.warning("no API keys configured and listening on %s: /v1/* is open to anyone who "
                    "can reach it (set ALIGNSERVE_API_KEYS or ALIGNSERVE_API_KEYS_FILE)",
                    settings.host)
    if keys.short_user_keys:
        log.warning("%d API key(s) shorter than %d characters: accepted on loopback only (a "
                    "server beyond loopback refuses to start with them)", keys.short_user_keys,
                    MIN_PUBLIC_KEY_CHARS)
