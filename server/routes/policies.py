"""The admin API of policy hot-swap, `/admin/policies` (server/policy/manager.py does the work):
list, register (and activate), activate, remove. Admin key only (server/auth.py `ADMIN_ROUTES`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..errors import error_responses
from ..policy.manager import PolicyManager
from ..protocol import PolicyCreate, PolicyInfo, PolicyList, PolicyStatus

_ERR = error_responses(400, 401, 403, 404, 409, 503)
# the admin API stays out of the public OpenAPI document (docs/operations.md documents it)
router = APIRouter(prefix="/admin/policies", tags=["admin"], include_in_schema=False)


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
    """Forget a registered policy (not the base one, not the active one); a LoRA adapter is
    unloaded once the requests running now have finished."""
    return await _manager(request).remove(name)
