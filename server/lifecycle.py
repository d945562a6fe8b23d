"""Process lifecycle: loading → ready → draining → stopped, and the graceful drain on SIGTERM.

Readiness (`/ready`) is true only in `ready`: after a one-token warm-up generation has gone
through the engine, and before a drain starts. `/health` (liveness) stays true while draining:
a pod that is finishing its work must not be restarted.

Drain, in order:
1. `begin_drain`: `/ready` fails, new `/v1/*` requests get 503 + Retry-After (`DrainGate`), and
   requests queued at the policy gate during a swap get 503 + Retry-After
   (server/policy/manager.py);
2. in-flight requests (streams included: they hold their admission slot to the end) run to
   completion, for at most `drain_timeout_s`;
3. past that deadline `abort` is set: every request still running has its engine work cancelled
   and answers 503 (in-band for streams), so the client may retry elsewhere;
4. `DrainingServer` then lets uvicorn close its sockets and connections; the CLI stops the engine.

uvicorn normally turns SIGTERM straight into "stop accepting, wait, exit" and re-raises the
signal at the end (the process then dies by it before any `finally` runs). `DrainingServer`
replaces that with the drain above and exits normally, so the engine is shut down cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from decoding.types import Sampling

from .errors import ServerDraining, error_response, to_api_error

log = logging.getLogger(__name__)

# After the drain, uvicorn only has to flush responses that are already complete.
POST_DRAIN_GRACE_S = 5.0


class Lifecycle:
    def __init__(self, admission, metrics, retry_after_s: int = 1) -> None:
        self.admission, self.metrics, self.retry_after_s = admission, metrics, retry_after_s
        self.state = "loading"  # loading | ready | warmup_failed | draining | stopped
        self.abort = asyncio.Event()  # set when the drain deadline passes
        # set when the drain starts: requests still queued at a closed policy gate (a swap in
        # progress) get 503 at once rather than wait for weights this pod will not serve long
        self.stopping = asyncio.Event()

    @property
    def accepting(self) -> bool:
        return self.state not in ("draining", "stopped")

    async def warm_up(self, engine) -> None:
        """One tiny generation: the engine really answers before /ready says so."""
        try:
            ids = engine.tokenizer.encode("Hello", add_special_tokens=False) or [0]
            await engine.generate(ids, 1, Sampling(max_tokens=1))
        except Exception:
            log.exception("warm-up generation failed; /ready stays false")
            if self.state == "loading":
                self.state = "warmup_failed"
            return
        if self.state == "loading":
            self.state = "ready"
            log.info("engine warmed up: ready")

    def begin_drain(self) -> None:
        if self.accepting:
            self.state = "draining"
            self.stopping.set()
            self.metrics.draining.set(1)
            log.info("draining: refusing new requests, %d in flight", self.admission.active)

    async def drain(self, timeout_s: float) -> bool:
        """Run the drain; True when every in-flight request finished within `timeout_s`."""
        self.begin_drain()
        try:
            if self.admission.active:
                await asyncio.wait_for(self.admission.wait_idle(), timeout_s)
            log.info("drained: no request in flight")
            return True
        except TimeoutError:
            log.warning("drain timeout (%g s): cancelling %d request(s)", timeout_s,
                        self.admission.active)
            self.abort.set()
        try:  # cancelled requests answer 503 at once; give them a moment to say so
            await asyncio.wait_for(self.admission.wait_idle(), POST_DRAIN_GRACE_S)
        except TimeoutError:
            log.error("%d request(s) did not stop after cancellation", self.admission.active)
        return False

    def stopped(self) -> None:
        self.state = "stopped"


class DrainGate:
    """Pure ASGI middleware: while draining, `/v1/*` gets 503 + Retry-After (OpenAI-shaped).
    Probes, metrics and `/admin/*` keep answering, so operators can watch the drain."""

    def __init__(self, app, lifecycle: Lifecycle, on_error=None) -> None:
        self.app, self.lifecycle, self.on_error = app, lifecycle, on_error

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if (path == "/v1" or path.startswith("/v1/")) and not self.lifecycle.accepting:
            err = to_api_error(ServerDraining("the server is shutting down; retry the request",
                                              self.lifecycle.retry_after_s))
            if self.on_error is not None:
                self.on_error(err)
            return await error_response(err)(scope, receive, send)
        await self.app(scope, receive, send)


class DrainingServer(uvicorn.Server):
    """uvicorn server whose first SIGTERM/SIGINT drains (see module doc) before it exits.
    A second signal cancels what is still running and stops; a third forces the exit."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float):
        super().__init__(config)
        self.lifecycle, self.drain_timeout_s = lifecycle, drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None
        self._signalled = False
        self.drained: bool | None = None  # outcome of the drain, once it ran

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Called from the signal handler (or a test): never re-raised afterwards, see module doc.
        if self.should_exit:
            self.force_exit = True
        elif self._signalled or self._loop is None:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.lifecycle.abort.set)
            self.should_exit = True
        else:
            self._signalled = True
            # The handler runs between bytecodes of the loop's thread: hand over thread-safely,
            # which also wakes a loop blocked in select(). (No logging here, in the handler.)
            self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, signame: str) -> None:
        log.info("received %s: draining for up to %g s", signame, self.drain_timeout_s)
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        self.drained = await self.lifecycle.drain(self.drain_timeout_s)
        self.should_exit = True
