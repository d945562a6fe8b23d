"""Policy checkpoints: register, list and hot-swap the served weights without a restart.

The served model starts as policy "base" (the folder the engine was started from). An admin
registers more full checkpoints of the same architecture (fine-tunes: SafeDPO, CAN, ...) and
activates any of them, "base" included, through `/admin/policies` (routes at the bottom).

Swap semantics (`PolicyManager.activate`):
1. the checkpoint is validated from metadata (`server.checkpoints`) before the engine is
   touched: a bad one is a 400 and the active policy keeps serving;
2. the gate closes: requests admitted from now on *queue* (they are not refused) before any
   engine work; one that waits longer than `policy_queue_timeout_s` gets 503 + Retry-After;
3. requests already running finish on the weights they started with. This is a per-request
   guarantee, not per engine call: best-of-n, speculative rejection and blockwise CD make many
   engine calls per answer, and mixing two policies inside one answer would also make its KL
   accounting meaningless. A stream holds its lease until its last event. If they do not finish
   within `policy_drain_timeout_s`, the swap is abandoned (503 to the admin, nothing changed):
   no user request ever fails because of a swap;
4. the engine reloads the weights in place and resets its prefix cache (KV blocks computed by
   the old weights are wrong for the new ones); a failed reload restores the previous weights;
5. the gate reopens and the queued requests run on the new policy.

In-place reload (not a second engine) because a second engine doubles model + KV memory and
costs an engine start (about a minute on CPU, more with torch.compile) per swap; the reload of a
135M model takes seconds. The registry lives in memory: a restart serves "base" again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request

from .checkpoints import (
    Checkpoint,
    CheckpointError,
    check_adapter,
    check_compatible,
    inspect,
    is_adapter,
)
from .errors import APIError
from .protocol import ErrorResponse, PolicyCreate, PolicyInfo, PolicyList, PolicyStatus, PolicySwap

log = logging.getLogger(__name__)

BASE = "base"


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


class PolicyGate:
    """Readers are requests (a lease each, held until their last byte), the writer is a swap.
    Writer preference: once the gate is closed new requests queue behind it, so a steady flow
    of requests can never starve a swap, and the swap waits only for those already running."""

    def __init__(self) -> None:
        self.held = 0  # requests running on the engine
        self.queued = 0  # requests waiting at the closed gate
        self.peak_queued = 0  # since the gate last closed
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def closed(self) -> bool:
        return not self._open.is_set()

    async def enter(self, timeout_s: float, retry_after_s: int) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._open.is_set():  # loop: a second swap may close it again before we run
            self.queued += 1
            self.peak_queued = max(self.peak_queued, self.queued)
            try:
                await asyncio.wait_for(self._open.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise APIError(503, f"a policy swap is in progress and took longer than "
                               f"{timeout_s:g} s; retry the request", type="server_error",
                               code="policy_swap_in_progress",
                               headers={"Retry-After": str(retry_after_s)}) from None
            finally:
                self.queued -= 1
        self.held += 1
        self._idle.clear()

    def leave(self) -> None:
        self.held -= 1
        if self.held == 0:
            self._idle.set()

    def close(self) -> None:
        self.peak_queued = self.queued
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class Lease:
    """One request's hold on the active policy; `release` is idempotent (the serving code calls
    it from one `finally`, whether or not `acquire` ran)."""

    def __init__(self, manager: PolicyManager) -> None:
        self._m, self._held = manager, False
        self.policy: str | None = None  # the policy this request runs on

    async def acquire(self) -> str:
        s = self._m.settings
        await self._m.gate.enter(s.policy_queue_timeout_s, s.retry_after_s)
        self._held, self.policy = True, self._m.active
        return self.policy

    def release(self) -> None:
        if self._held:
            self._held = False
            self._m.gate.leave()


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
        self.managed_by: str | None = None  # a policy file (server/policy_file.py) owns `active`
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

    async def register(self, body: PolicyCreate, managed: bool = False) -> PolicyStatus:
        if body.activate:
            self._check_unmanaged(managed)
        known = self.policies.get(body.name)
        if known is None and body.path is None:
            raise APIError(400, f"policy {body.name!r} is not registered: give its checkpoint "
                           "`path`", param="path", code="missing_path")
        if body.name == BASE:  # reserved for the weights the engine started with
            if body.path is not None and _norm(body.path) != _norm(known.path):
                raise APIError(409, f"the name {BASE!r} is reserved for the served model "
                               f"({known.path}); choose another name", param="name",
                               code="policy_exists")
            resolved = known.path
        else:
            path = body.path if body.path is not None else known.path
            if is_adapter(path):
                return await self._register_adapter(body.name, path, known)
            resolved = await self._validate(path)
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
        return await self._activate(policy, validated=False)

    async def _register_adapter(self, name: str, path: str, known: Policy | None):
        """Adapters are loaded into the engine once and chosen per request (`model`)."""
        if not (self.settings.enable_lora and self.engine.lora_enabled):
            raise APIError(400, "LoRA adapters are disabled on this server: start it with "
                           "--enable-lora true (costs: docs/operations.md, 'LoRA adapters') or "
                           "merge the adapter into a full checkpoint", param="path",
                           code="lora_disabled")
        if name == self.served_name:
            raise APIError(409, f"{name!r} is the served model's name; choose another",
                           param="name", code="policy_exists")
        resolved = await self._validate(path, adapter=True)
        known = self.policies.get(name)  # re-read after the await
        if known is not None:
            if known.kind == "lora" and known.path == resolved:
                return PolicyStatus(**known.info(self.active).model_dump())
            raise APIError(409, f"policy {name!r} is already registered with another path "
                           f"({known.path}); choose another name", param="name",
                           code="policy_exists")
        try:
            await self.engine.add_adapter(name, resolved)
        except Exception as exc:
            log.exception("loading adapter %r failed", name)
            raise APIError(400, f"adapter failed to load ({type(exc).__name__}: "
                           f"{str(exc)[:300]})", param="path", code="lora_load_failed") from None
        policy = self.policies[name] = Policy(name, resolved, int(time.time()), kind="lora")
        self.adapters[name] = resolved
        log.info("LoRA adapter %r registered from %s", name, resolved)
        return PolicyStatus(**policy.info(self.active).model_dump())

    def remove(self, name: str) -> PolicyInfo:
        policy = self._get(name)
        if policy.kind == "lora":
            raise APIError(409, f"{name!r} is a LoRA adapter: adapters stay loaded until the "
                           "server restarts", param="name", code="policy_in_use")
        if name == BASE or name == self.active:
            what = "the base policy" if name == BASE else "active"
            raise APIError(409, f"policy {name!r} is {what} and cannot be removed",
                           param="name", code="policy_in_use")
        del self.policies[name]
        self.metrics.policy_active.remove(name)
        return policy.info(self.active)

    def _get(self, name: str) -> Policy:
        if name not in self.policies:
            raise APIError(404, f"policy {name!r} is not registered; known: "
                           f"{', '.join(self.policies)}", type="not_found_error", param="name",
                           code="policy_not_found")
        return self.policies[name]

    async def _validate(self, path: str, adapter: bool = False) -> str:
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
                return str(check_adapter(path, self._base, self.settings.max_lora_rank))
            new = inspect(path)
            check_compatible(self._base, new)
            return str(new.path)

        try:  # reads headers and tokenizer.json: off the event loop
            return await asyncio.to_thread(check)
        except CheckpointError as exc:
            self.metrics.policy_swaps.labels("rejected").inc()
            raise APIError(400, exc.message, param="path", code=exc.code) from None

    # ------------------------------------------------------------------ swap

    async def _activate(self, policy: Policy, validated: bool) -> PolicyStatus:
        if self._swap_lock.locked():
            raise APIError(409, "another policy swap is in progress; retry when it is done",
                           code="policy_swap_in_progress",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        if not validated and policy.name != BASE:  # the files may have changed since
            await self._validate(policy.path)
        # Shielded: an admin client that hangs up must not cancel a reload half-way.
        task = asyncio.ensure_future(self._swap(policy))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, if orphaned
        return await asyncio.shield(task)

    async def _swap(self, policy: Policy) -> PolicyStatus:
        async with self._swap_lock:
            s, m, previous = self.settings, self.metrics, self.policies[self.active]
            t0 = time.monotonic()
            running = self.gate.held
            self.gate.close()
            m.policy_swapping.set(1)
            log.info("policy swap %r -> %r: waiting for %d request(s) in flight",
                     previous.name, policy.name, running)
            try:
                try:
                    await asyncio.wait_for(self.gate.wait_idle(), s.policy_drain_timeout_s)
                except TimeoutError:
                    m.policy_swaps.labels("timeout").inc()
                    raise APIError(503, f"{self.gate.held} request(s) were still running after "
                                   f"{s.policy_drain_timeout_s:g} s; the swap was cancelled and "
                                   f"policy {previous.name!r} keeps serving", type="server_error",
                                   code="policy_swap_timeout",
                                   headers={"Retry-After": str(s.retry_after_s)}) from None
                t1 = time.monotonic()
                await self._reload(policy, previous)
                t2 = time.monotonic()
            finally:
                queued = self.gate.peak_queued
                self.gate.open()
                m.policy_swapping.set(0)
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

    async def _reload(self, policy: Policy, previous: Policy) -> None:
        try:
            await self.engine.reload_weights(policy.path)
            await self.engine.reset_prefix_cache()
            return
        except Exception as exc:
            log.exception("reloading policy %r failed; restoring %r", policy.name, previous.name)
            self.metrics.policy_swaps.labels("failed").inc()
            reason = f"{type(exc).__name__}: {str(exc)[:300]}"
        try:
            await self.engine.reload_weights(previous.path)
            await self.engine.reset_prefix_cache()
        except Exception:
            log.critical("restoring policy %r failed: the weights are in an unknown state",
                         previous.name, exc_info=True)
            raise APIError(500, "the checkpoint failed to load and the previous weights could not "
                           "be restored; restart the server", type="server_error",
                           code="policy_restore_failed") from None
        raise APIError(400, f"checkpoint failed to load ({reason}); policy {previous.name!r} "
                       "was restored and keeps serving", param="path", code="policy_load_failed")


# ---------------------------------------------------------------------- admin routes

_ERR = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 503)}
router = APIRouter(prefix="/admin/policies", tags=["admin"])


def _manager(request: Request) -> PolicyManager:
    return request.app.state.policies


@router.get("", response_model=PolicyList, responses=_ERR)
async def list_policies(request: Request) -> PolicyList:
    """Known policies, which one serves, and when each was last loaded (admin key)."""
    return _manager(request).listing()


@router.post("", response_model=PolicyStatus, responses=_ERR)
async def register_policy(body: PolicyCreate, request: Request) -> PolicyStatus:
    """Register a full checkpoint folder; with `activate` (default) swap it in without dropping
    requests. POSTing a known name again (path omitted or equal) activates it."""
    return await _manager(request).register(body)


@router.post("/{name}/activate", response_model=PolicyStatus, responses=_ERR)
async def activate_policy(name: str, request: Request) -> PolicyStatus:
    """Swap a registered policy ("base" included) in."""
    return await _manager(request).activate(name)


@router.delete("/{name}", response_model=PolicyInfo, responses=_ERR)
async def remove_policy(name: str, request: Request) -> PolicyInfo:
    """Forget a registered policy (not the base one, not the active one)."""
    return _manager(request).remove(name)


def _norm(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())
