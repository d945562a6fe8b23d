"""Policy checkpoints: register, list and hot-swap the served weights without a restart.

The served model starts as policy "base" (the folder the engine was started from). An admin
registers more full checkpoints of the same architecture (fine-tunes: SafeDPO, CAN, ...) and
activates any of them, "base" included, through `/admin/policies` (server/routes/policies.py).

Swap semantics (`PolicyManager.activate`):
1. the checkpoint is validated from metadata (`server.policy.checkpoints`) before the engine is
   touched: a bad one is a 400 and the active policy keeps serving;
2. the gate closes: requests admitted from now on *queue* (they are not refused) before any
   engine work; one that waits longer than `policy_queue_timeout_s` gets 503 + Retry-After;
3. requests already running finish on the weights they started with. This is a per-request
   guarantee, not per engine call: best-of-n, speculative rejection and blockwise CD make many
   engine calls per answer, and mixing two policies inside one answer would also make its KL
   accounting meaningless. A stream holds its lease until its last event. Those still running
   at `policy_drain_timeout_s` are ended with 503 + Retry-After (in-band for streams) and the
   swap goes on; only if they do not stop within `EVICT_GRACE_S` more is it abandoned (503 to
   the admin, nothing changed). Set request_timeout_s <= policy_drain_timeout_s and no request
   is ever cut by a swap;
4. the engine reloads the weights in place (at most `policy_reload_timeout_s`) and resets its
   prefix cache (KV blocks computed by the old weights are wrong for the new ones); a canary
   generation checks the new weights (server/policy/guard.py); a failed or timed-out reload or
   a failed canary restores the previous weights. If restoring fails too, the weights are in
   an unknown state: /health and /ready answer 503 and requests get 503 until a later swap
   succeeds (or the pod restarts);
5. the gate reopens and the queued requests run on the new policy. Requests queued at the gate
   leave it on their own cutoff (timeout, disconnect) and, when the server starts draining
   (SIGTERM), at once with 503 (server/serving/ticket.py).

Admin paths must lie inside `policy_root` (server/policy/guard.py). LoRA adapters number at most
`max_lora_adapters` and can be removed (DELETE, after the running requests finish, as a swap).

In-place reload (not a second engine) because a second engine doubles model + KV memory and
costs an engine start (about a minute on CPU, more with torch.compile) per swap; the reload of a
135M model takes seconds. The registry lives in memory: a restart serves "base" again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import APIError
from ..protocol import PolicyCreate, PolicyInfo, PolicyList, PolicyStatus, PolicySwap
from .checkpoints import (
    Checkpoint,
    CheckpointError,
    check_adapter,
    check_compatible,
    check_finite,
    inspect,
    is_adapter,
)
from .gate import Lease, PolicyGate
from .guard import CanaryFailed, canary, confine, default_root

log = logging.getLogger(__name__)

BASE = "base"
EVICT_GRACE_S = 10.0  # after the drain deadline: how long evicted requests get to say so


@dataclass
class Policy:
    name: str
    path: str | None  # checkpoint folder; for "base" the engine's model (a folder or a hub id)
    registered_at: int
    loaded_at: int | None = None  # when it last became active
    activations: int = 0
    kind: str = "full"  # or "lora": an adapter chosen per request, never "active"

    def info(self, active: str) -> PolicyInfo:
        return PolicyInfo(name=self.name, path=self.path, kind=self.kind,
                          active=self.name == active,
                          registered_at=self.registered_at, loaded_at=self.loaded_at,
                          activations=self.activations)


class PolicyManager:
    def __init__(self, runtime, settings, metrics) -> None:
        self.engine, self.settings, self.metrics = runtime.engine, settings, metrics
        self.served_name = runtime.model_name
        self.adapters: dict[str, str] = runtime.adapters  # shared: serving resolves `model`
        now = int(time.time())
        base_path = self.engine.model_path
        self.policies = {BASE: Policy(BASE, base_path, now, now, 1)}
        self.active = BASE
        self.swaps = 0
        self.gate = PolicyGate()
        self._swap_lock = asyncio.Lock()
        self._base: Checkpoint | None = None  # metadata of the served model, read once
        self.managed_by: str | None = None  # a policy file (server/policy/file.py) owns `active`
        self.weights_unknown = False  # a reload and its restore both failed (module doc, 4.)
        self.root = settings.policy_root or default_root(base_path)  # admin paths live here
        metrics.policy_active.labels(BASE).set(1)

    def lease(self) -> Lease:
        return Lease(self)

    def listing(self) -> PolicyList:
        return PolicyList(active=self.active, swapping=self.gate.closed, swaps=self.swaps,
                          data=[p.info(self.active) for p in self.policies.values()])

    # ------------------------------------------------------------------ registry

    def _check_unmanaged(self, managed: bool) -> None:
        if self.managed_by is not None and not managed:
            raise APIError(409, f"the active policy is set by the policy file {self.managed_by} "
                           "for the whole fleet; change the file (activation here would only "
                           "swap this pod)", code="policy_file_managed")

    def confine(self, path: str, param: str = "path") -> None:
        """400 unless `path` resolves inside `policy_root` (one message for outside and missing:
        server/policy/guard.py)."""
        try:
            confine(path, self.root)
        except CheckpointError as exc:
            raise APIError(400, exc.message, param=param, code=exc.code) from None

    async def register(self, body: PolicyCreate, managed: bool = False) -> PolicyStatus:
        """`managed`: called for the policy file, whose paths are not confined to the root."""
        if body.activate:
            self._check_unmanaged(managed)
        if body.path is not None and not managed and body.name != BASE:
            self.confine(body.path)
        known = self.policies.get(body.name)
        if known is None and body.path is None:
            raise APIError(400, f"policy {body.name!r} is not registered: give its checkpoint "
                           "`path`", param="path", code="missing_path")
        if body.name == BASE:  # reserved for the weights the engine started with
            assert known is not None  # registered at start-up, never removed
            if body.path is not None and _norm(body.path) != _norm(known.path):
                raise APIError(409, f"the name {BASE!r} is reserved for the served model "
                               f"({known.path}); choose another name", param="name",
                               code="policy_exists")
            resolved = known.path
        else:
            path = body.path if body.path is not None else known.path if known else None
            assert path is not None  # refused above (missing_path); non-base paths are set
            root = None if managed else self.root
            if is_adapter(path):
                return await self._register_adapter(body.name, path, known, root)
            resolved = await self._validate(path, root=root)
            known = self.policies.get(body.name)  # re-read: another call may have registered it
            if known is not None and resolved != known.path:
                raise APIError(409, f"policy {body.name!r} is already registered with another "
                               f"path ({known.path}); choose another name", param="name",
                               code="policy_exists")
        if known is None:
            known = self.policies[body.name] = Policy(body.name, resolved, int(time.time()))
            self.metrics.policy_active.labels(body.name).set(0)
            log.info("policy %r registered from %s", body.name, resolved)
        if not body.activate:
            return PolicyStatus(**known.info(self.active).model_dump())
        return await self._activate(known, validated=True)

    async def activate(self, name: str, managed: bool = False) -> PolicyStatus:
        self._check_unmanaged(managed)
        policy = self._get(name)
        if policy.kind == "lora":
            raise APIError(400, f"{name!r} is a LoRA adapter: requests choose it with "
                           f"`\"model\": \"{name}\"`; it is not activated", param="name",
                           code="adapter_not_activatable")
        return await self._activate(policy, validated=False, managed=managed)

    async def _register_adapter(self, name: str, path: str, known: Policy | None,
                                root: Path | None):
        """Adapters are loaded into the engine once and chosen per request (`model`)."""
        if not (self.settings.enable_lora and self.engine.lora_enabled):
            raise APIError(400, "LoRA adapters are disabled on this server: start it with "
                           "--enable-lora true (costs: docs/operations.md, 'LoRA adapters') or "
                           "merge the adapter into a full checkpoint", param="path",
                           code="lora_disabled")
        if name == self.served_name:
            raise APIError(409, f"{name!r} is the served model's name; choose another",
                           param="name", code="policy_exists")
        resolved = await self._validate(path, adapter=True, root=root)
        known = self.policies.get(name)  # re-read after the await
        if known is not None:
            if known.kind == "lora" and known.path == resolved:
                return PolicyStatus(**known.info(self.active).model_dump())
            raise APIError(409, f"policy {name!r} is already registered with another path "
                           f"({known.path}); choose another name", param="name",
                           code="policy_exists")
        limit = self.settings.max_lora_adapters
        if sum(p.kind == "lora" for p in self.policies.values()) >= limit:
            raise APIError(409, f"{limit} LoRA adapters are loaded (max_lora_adapters); remove "
                           "one first (DELETE /admin/policies/NAME)", param="name",
                           code="too_many_adapters")
        try:
            await self.engine.add_adapter(name, resolved)
        except Exception:  # the details (paths, engine internals) go to the log only
            log.exception("loading adapter %r failed", name)
            raise APIError(400, "the adapter failed to load in the engine (details in the "
                           "server log)", param="path", code="lora_load_failed") from None
        policy = self.policies[name] = Policy(name, resolved, int(time.time()), kind="lora")
        self.adapters[name] = resolved
        log.info("LoRA adapter %r registered from %s", name, resolved)
        return PolicyStatus(**policy.info(self.active).model_dump())

    async def remove(self, name: str) -> PolicyInfo:
        policy = self._get(name)
        if policy.kind == "lora":
            return await self._remove_adapter(policy)
        if name == BASE or name == self.active:
            what = "the base policy" if name == BASE else "active"
            raise APIError(409, f"policy {name!r} is {what} and cannot be removed",
                           param="name", code="policy_in_use")
        del self.policies[name]
        self.metrics.policy_active.remove(name)
        return policy.info(self.active)

    async def _remove_adapter(self, policy: Policy) -> PolicyInfo:
        """Unload an adapter once no running request can be using it: new requests stop
        finding it at once; those running finish first (as for a swap, under the gate)."""
        remove = getattr(self.engine, "remove_adapter", None)
        if remove is None:
            raise APIError(409, "this engine cannot unload LoRA adapters; they stay loaded until "
                           "the server restarts", param="name", code="policy_in_use")
        self._busy()
        path = self.adapters.pop(policy.name, None)  # `model` no longer resolves to it
        try:
            async with self._exclusive("remove adapter " + policy.name):
                await asyncio.wait_for(remove(policy.name), self.settings.policy_reload_timeout_s)
        except BaseException:
            if path is not None:
                self.adapters[policy.name] = path  # still loaded: still usable
            raise
        del self.policies[policy.name]
        self.metrics.policy_active.remove(policy.name)
        log.info("LoRA adapter %r removed", policy.name)
        return policy.info(self.active)

    def _get(self, name: str) -> Policy:
        if name not in self.policies:
            raise APIError(404, f"policy {name!r} is not registered; known: "
                           f"{', '.join(self.policies)}", type="not_found_error", param="name",
                           code="policy_not_found")
        return self.policies[name]

    async def _validate(self, path: str, adapter: bool = False, root: Path | None = None
                        ) -> str:
        """The checkpoint folder, resolved, once it is known to fit the served model."""
        def check() -> str:
            if self._base is None:
                base = self.policies[BASE].path
                try:
                    self._base = inspect(base) if base else None
                except CheckpointError:
                    self._base = None
                if self._base is None:
                    raise CheckpointError("hot-swapping needs the served model as a local folder "
                                          f"(it was started from {base!r})", "base_not_local")
            if adapter:
                folder = check_adapter(path, self._base, self.settings.max_lora_rank, root)
            else:
                checkpoint = inspect(path, root)
                check_compatible(self._base, checkpoint)
                folder = checkpoint.path
            check_finite(folder)  # reads every weight: before the gate closes, off the loop
            return str(folder)

        try:  # reads headers and tokenizer.json: off the event loop
            return await asyncio.to_thread(check)
        except CheckpointError as exc:
            self.metrics.policy_swaps.labels("rejected").inc()
            raise APIError(400, exc.message, param="path", code=exc.code) from None

    # ------------------------------------------------------------------ swap

    def evicted_error(self) -> APIError:
        """What a request still running at a swap's drain deadline ends with."""
        return APIError(503, "a policy swap needed this request to finish and it ran past the "
                        "swap's drain deadline; retry it", type="server_error",
                        code="policy_swap_deadline",
                        headers={"Retry-After": str(self.settings.retry_after_s)})

    def _busy(self) -> None:
        if self._swap_lock.locked():
            raise APIError(409, "another policy swap is in progress; retry when it is done",
                           code="policy_swap_in_progress",
                           headers={"Retry-After": str(self.settings.retry_after_s)})

    async def _activate(self, policy: Policy, validated: bool, managed: bool = False
                        ) -> PolicyStatus:
        self._busy()
        # The files may have changed since registration (base: the engine's own weights).
        if not validated and policy.path is not None and policy.name != BASE:
            await self._validate(policy.path, root=None if managed else self.root)
        # Shielded: an admin client that hangs up must not cancel a reload half-way.
        task = asyncio.ensure_future(self._swap(policy))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, if orphaned
        return await asyncio.shield(task)

    @contextlib.asynccontextmanager
    async def _exclusive(self, what: str) -> AsyncIterator[int]:
        """Close the gate, wait for the running requests (ending stragglers at the drain
        deadline), run the body with the engine to ourselves, reopen. Yields how many requests
        were running when the gate closed."""
        async with self._swap_lock:
            m = self.metrics
            running = self.gate.held
            self.gate.close()
            m.policy_swapping.set(1)
            log.info("%s: waiting for %d request(s) in flight", what, running)
            try:
                await self._drain()
                yield running
            finally:
                self.gate.open()
                m.policy_swapping.set(0)

    async def _drain(self) -> None:
        s = self.settings
        try:
            await asyncio.wait_for(self.gate.wait_idle(), s.policy_drain_timeout_s)
            return
        except TimeoutError:
            log.warning("policy swap: %d request(s) still running after %g s: ending them "
                        "with 503", self.gate.held, s.policy_drain_timeout_s)
            self.gate.evict.set()
        try:
            await asyncio.wait_for(self.gate.wait_idle(), EVICT_GRACE_S)
        except TimeoutError:
            self.metrics.policy_swaps.labels("timeout").inc()
            raise APIError(503, f"{self.gate.held} request(s) were still running after "
                           f"{s.policy_drain_timeout_s:g} s and did not stop; the swap was "
                           f"cancelled and policy {self.active!r} keeps serving",
                           type="server_error", code="policy_swap_timeout",
                           headers={"Retry-After": str(s.retry_after_s)}) from None

    async def _swap(self, policy: Policy) -> PolicyStatus:
        m, previous = self.metrics, self.policies[self.active]
        t0 = time.monotonic()
        async with self._exclusive(f"policy swap {previous.name!r} -> {policy.name!r}") as running:
            t1 = time.monotonic()
            await self._reload(policy, previous)
            t2 = time.monotonic()
            queued = self.gate.peak_queued
        now = int(time.time())
        policy.loaded_at, policy.activations = now, policy.activations + 1
        m.policy_active.labels(previous.name).set(0)
        m.policy_active.labels(policy.name).set(1)
        m.policy_swaps.labels("ok").inc()
        m.policy_swap_seconds.observe(t2 - t0)
        self.active, self.swaps = policy.name, self.swaps + 1
        swap = PolicySwap(previous=previous.name, drained_requests=running,
                          queued_requests=queued, drain_s=round(t1 - t0, 4),
                          reload_s=round(t2 - t1, 4), total_s=round(t2 - t0, 4))
        log.info("policy %r active (drain %.2f s, reload %.2f s, %d queued)", policy.name,
                 swap.drain_s, swap.reload_s, queued)
        return PolicyStatus(**policy.info(self.active).model_dump(), swap=swap)

    async def _load(self, path: str | None) -> None:
        """Reload, reset the prefix cache and run the canary, each within the reload timeout;
        on success the weights are known again."""
        limit = self.settings.policy_reload_timeout_s
        await asyncio.wait_for(self.engine.reload_weights(path), limit)
        await asyncio.wait_for(self.engine.reset_prefix_cache(), limit)
        await asyncio.wait_for(canary(self.engine), limit)
        self.weights_unknown = False

    async def _reload(self, policy: Policy, previous: Policy) -> None:
        try:
            await self._load(policy.path)
            return
        except CanaryFailed as exc:
            status, code, reason = 400, "policy_canary_failed", f"the canary failed: {exc}"
        except TimeoutError:
            status, code = 504, "policy_load_timeout"
            reason = f"loading took over {self.settings.policy_reload_timeout_s:g} s"
        except Exception:  # details (paths, engine internals) go to the log only
            status, code = 400, "policy_load_failed"
            reason = "the engine could not load it (details in the server log)"
        log.error("loading policy %r failed (%s); restoring %r", policy.name, reason,
                  previous.name, exc_info=code == "policy_load_failed")
        self.metrics.policy_swaps.labels("failed").inc()
        try:
            await self._load(previous.path)
        except Exception:
            self.weights_unknown = True
            self.metrics.policy_swaps.labels("restore_failed").inc()
            log.critical("restoring policy %r failed: the weights are in an unknown state; "
                         "/health answers 503 until a swap succeeds", previous.name,
                         exc_info=True)
            raise APIError(503, "the checkpoint failed to load and the previous weights could not "
                           "be restored: this replica refuses requests until a swap succeeds or "
                           "it restarts", type="server_error", code="policy_restore_failed",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        raise APIError(status, f"checkpoint rejected: {reason}; policy {previous.name!r} was "
                       "restored and keeps serving", param="path", code=code)


def _norm(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())
