"""vLLM's runtime LoRA routes, `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`,
on the machinery of `POST /admin/policies` (server/policy/manager.py: `policy_root`, the adapter
cap, draining before an unload). Same request bodies and plain-text answers as vLLM's server, so
scripts written for it work; unlike vLLM (where an environment variable opens them to anyone)
they need the admin key (server/auth.py `ADMIN_ROUTES`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import APIError, error_responses
from ..policy.checkpoints import is_adapter
from ..policy.manager import PolicyManager
from ..protocol import PolicyCreate

router = APIRouter(tags=["admin"], include_in_schema=False)  # admin: not in the public document
_ERR = error_responses(400, 401, 403, 404, 409, 503)


class LoadLoRAAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = Field(False, description="vLLM's: reload an adapter of the same name "
                               "in place. Refused: unload it first.")


class UnloadLoRAAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(max_length=64)
    lora_int_id: int | None = Field(None, description="vLLM's engine id; ignored, the name "
                                    "identifies the adapter here.")


def _manager(request: Request) -> PolicyManager:
    return request.app.state.policies


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=_ERR)
async def load_lora_adapter(body: LoadLoRAAdapter, request: Request) -> PlainTextResponse:
    if body.load_inplace:
        raise APIError(400, "load_inplace is not supported: unload the adapter, then load it",
                       param="load_inplace", code="unsupported_field")
    manager = _manager(request)
    if body.lora_name in manager.policies:
        raise APIError(400, f"the LoRA adapter {body.lora_name!r} has already been loaded",
                       param="lora_name", code="invalid_value")
    # confined to policy_root first, so the check below cannot probe other folders
    manager.confine(body.lora_path, "lora_path")
    if not is_adapter(body.lora_path):
        raise APIError(400, "lora_path holds no LoRA adapter (adapter_config.json); a full "
                       "checkpoint goes through POST /admin/policies", param="lora_path",
                       code="invalid_value")
    await manager.register(PolicyCreate(name=body.lora_name, path=body.lora_path,
                                        activate=False))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=_ERR)
async def unload_lora_adapter(body: UnloadLoRAAdapter, request: Request) -> PlainTextResponse:
    manager = _manager(request)
    policy = manager.policies.get(body.lora_name)
    if policy is None or policy.kind != "lora":
        raise APIError(404, f"no LoRA adapter named {body.lora_name!r}", param="lora_name",
                       type="not_found_error", code="lora_not_found")
    await manager.remove(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
