"""Fleet-wide policies: the active policy as declarative state in a file every replica watches.

`--policy-file PATH` (in Kubernetes: a ConfigMap mounted as a file; checkpoints on the model
volume) holds `{"active": NAME, "policies": {NAME: checkpoint folder, ...}}`. Each replica polls
it every `policy_file_poll_s` (mtime, size, then a SHA-256 of the content: ConfigMap updates
swap a symlink, so the content hash is what decides) and, when the content changed, registers
the policies it lists and activates `active` through `PolicyManager` — the same swap as
`/admin/policies`: validation first, new requests queue, running ones finish on the weights they
started with, nothing fails. The name "base" always means the folder the engine started from.

Start-up: the replica applies the file before its warm-up, so `/ready` turns true only once it
serves the file's policy; a replica the HPA adds therefore never serves a stale one.

A change that cannot be applied (bad checkpoint, a drain that timed out) leaves the replica on
its previous policy, shows under `GET /admin/status` → `policy_file.error`, and is retried with
exponential backoff (poll_s × 2^(failures−1), at most `MAX_BACKOFF_S`; `failures` and
`retry_at` in the status): every retry closes the policy gate for up to the drain timeout, so a
change that keeps failing must not keep new requests queueing. A new version of the file is
tried at once. `policy_file.generation` (the content hash's first 12 hex digits) says which version
each replica applied.

With a policy file the admin API is read-only for activation (409 `policy_file_managed`): an
activation on one pod would make the fleet serve a mix of policies until the next change, and a
pod cannot write the ConfigMap (no API token in the pod, by design). Change the file instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import APIError
from ..protocol import PolicyCreate
from .manager import BASE

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 600.0  # the longest wait between retries of a change that keeps failing
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class PolicyFileState:
    active: str
    policies: dict[str, str]
    generation: str  # SHA-256 of the content, first 12 hex digits


def parse_policy_file(text: str) -> PolicyFileState:
    """Validate the file's shape (not the checkpoints: those need the engine's model)."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) - {"active", "policies"} or "active" not in doc:
        raise ValueError('expected {"active": NAME, "policies": {NAME: folder, ...}}')
    policies = doc.get("policies") or {}
    if not isinstance(policies, dict) or not all(
            isinstance(k, str) and _NAME.match(k) and isinstance(v, str) and v
            for k, v in policies.items()):
        raise ValueError("`policies` must map names (letters, digits, '.', '_', '-') to folders")
    if BASE in policies:
        raise ValueError(f"{BASE!r} is the served model itself; do not list it")
    active = doc["active"]
    if not isinstance(active, str) or (active != BASE and active not in policies):
        raise ValueError(f"`active` must be {BASE!r} or one of `policies`, not {active!r}")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return PolicyFileState(active, dict(policies), digest)


def load_policy_file(path: Path) -> PolicyFileState:
    return parse_policy_file(Path(path).expanduser().read_text())


class PolicyFileWatcher:
    """Keeps one replica's PolicyManager on the file's active policy."""

    def __init__(self, manager, path: Path, poll_s: float) -> None:
        self.manager, self.path, self.poll_s = manager, Path(path).expanduser(), poll_s
        self.applied: PolicyFileState | None = None
        self.applied_at: float | None = None
        self.error: str | None = None
        self._seen: tuple | None = None  # (mtime_ns, size, inode) of the last read
        self._failed: str | None = None  # generation whose apply failed (retried, backing off)
        self.failures = 0  # consecutive failed applies of `_failed`
        self.retry_at: float | None = None  # wall-clock time of the next retry (backoff)
        manager.managed_by = str(self.path)

    def status(self) -> dict:
        return {"path": str(self.path), "poll_s": self.poll_s,
                "generation": self.applied.generation if self.applied else None,
                "active": self.applied.active if self.applied else None,
                "applied_at": self.applied_at, "error": self.error,
                "failures": self.failures, "retry_at": self.retry_at}

    def backoff_s(self) -> float:
        """Wait before retrying the change that failed `failures` times in a row."""
        return min(MAX_BACKOFF_S, self.poll_s * 2 ** max(0, self.failures - 1))

    async def sync(self) -> bool:
        """Apply the file if its content changed (or a previous apply failed); True when the
        replica now serves the file's active policy."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._seen and self._failed is None:
                return self.applied is not None
            state = await asyncio.to_thread(load_policy_file, self.path)
        except (OSError, ValueError) as exc:
            self.error = f"cannot read {self.path}: {exc}"
            log.error("policy file: %s", self.error)
            return self.applied is not None
        self._seen = stamp
        if self.applied is not None and state.generation == self.applied.generation:
            self._failed = self.error = self.retry_at = None  # reverted to what is served
            self.failures = 0
            return True
        if state.generation != self._failed:
            self.failures = 0  # a new version: tried at once, backoff starts again
        elif self.retry_at is not None and time.time() < self.retry_at:
            return False  # the same failed change: wait out the backoff
        try:
            await self._apply(state)
        except APIError as exc:
            self._failed, self.error = state.generation, f"generation {state.generation}: " \
                                                         f"{exc.message}"
            self.failures += 1
            self.retry_at = time.time() + self.backoff_s()
            log.error("policy file: %s (still serving %r; retried in %g s)",
                      self.error, self.manager.active, self.backoff_s())
            return False
        self.applied, self.applied_at = state, time.time()
        self._failed = self.error = self.retry_at = None
        self.failures = 0
        log.info("policy file generation %s applied: %r active", state.generation, state.active)
        return True

    async def _apply(self, state: PolicyFileState) -> None:
        m = self.manager
        reload_active = False
        for name, path in state.policies.items():
            known = m.policies.get(name)
            try:
                if known is None:
                    await m.register(PolicyCreate(name=name, path=path, activate=False),
                                     managed=True)
                    continue
                resolved = await m._validate(path)  # a 400 APIError when it does not fit
            except APIError as exc:
                raise APIError(exc.status, f"policy {name!r} ({path}): {exc.message}",
                               code=exc.code) from None
            if resolved != known.path:  # the file points the name at another folder
                known.path = resolved
                reload_active |= name == m.active
        if m.active != state.active or reload_active:
            await m.activate(state.active, managed=True)

    async def run_until_ready(self) -> None:
        """At start-up: apply the file before the replica reports ready (retrying each poll)."""
        while not await self.sync():
            await asyncio.sleep(self.poll_s)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync()
            except Exception:  # never let the watcher die: log and keep polling
                log.exception("policy file watch failed")
