"""Operations (not OpenAI): probes, Prometheus metrics and the admin status."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..errors import error_responses
from ..lifecycle import Lifecycle
from ..protocol import AdminStatus, ProbeStatus

_ADMIN_ERRORS = error_responses(401, 403)
_PROBE = error_responses(503, model=ProbeStatus)

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=ProbeStatus, responses=_PROBE)
async def health(request: Request):
    """Liveness: 503 when the engine is dead, or when a failed policy swap left the weights in
    an unknown state (server/policy/manager.py): a restart is the way back to known weights."""
    if request.app.state.policies.weights_unknown:
        return JSONResponse({"status": "weights_unknown"}, status_code=503)
    try:
        await request.app.state.runtime.engine.check_health()
    except Exception:
        return JSONResponse({"status": "unhealthy"}, status_code=503)
    return {"status": "ok"}


@router.get("/ready", response_model=ProbeStatus, responses=_PROBE)
async def ready(request: Request):
    """Readiness: 200 once warmed up, 503 while loading, draining or unhealthy."""
    lc: Lifecycle = request.app.state.lifecycle
    if lc.state != "ready":
        return JSONResponse({"status": lc.state}, status_code=503)
    return await health(request)


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/admin/status", response_model=AdminStatus, responses=_ADMIN_ERRORS,
            include_in_schema=False)  # admin: not in the public document
async def admin_status(request: Request) -> AdminStatus:
    """Operator view (admin key): lifecycle state, load and limits. Never shows keys."""
    st = request.app.state
    return AdminStatus(state=st.lifecycle.state, model=st.runtime.model_name,
                       requests_in_flight=st.admission.active,
                       max_concurrent_requests=st.settings.max_concurrent_requests,
                       engine_requests_unfinished=st.runtime.engine.num_unfinished_requests(),
                       user_keys=st.keys.user_key_count, policy=st.policies.active,
                       policy_file=st.policy_file.status() if st.policy_file else None)
