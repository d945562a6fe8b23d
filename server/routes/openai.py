"""The OpenAI endpoints: /v1/chat/completions, /v1/completions and /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from runtime.protocols import Runtime

from ..errors import OpenAPIResponses, error_responses
from ..protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)

# Declared in the OpenAPI schema (the fuzz tests hold the app to it).
_ERRORS = error_responses(400, 401, 404, 413, 429, 500, 503, 504)
_COMPLETION: OpenAPIResponses = {**_ERRORS, 200: {"content": {"text/event-stream": {}},
                                "description": "JSON, or SSE chunks with `stream: true`"}}
_LIST_ERRORS = error_responses(401, 503)

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=_COMPLETION)
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response):
    return await request.app.state.chat.create(body, request, response)


@router.post("/v1/completions", response_model=CompletionResponse, responses=_COMPLETION)
async def completions(body: CompletionRequest, request: Request, response: Response):
    return await request.app.state.completions.create(body, request, response)


@router.get("/v1/models", response_model=ModelList, responses=_LIST_ERRORS,
            response_model_exclude_none=True)
async def models(request: Request) -> ModelList:
    """The base model, its presets (server/presets.py) and its LoRA adapters."""
    rt: Runtime = request.app.state.runtime
    base, max_len = rt.model_name, rt.engine.max_model_len
    presets = [ModelCard(id=p.name, root=base, parent=base, max_model_len=max_len,
                         alignment=p.alignment, description=p.description)
               for p in request.app.state.serving.resolver.presets]
    adapters = [ModelCard(id=name, root=name, parent=base, max_model_len=max_len)
                for name in rt.adapters]  # LoRA adapters (server/policy/manager.py)
    return ModelList(data=[ModelCard(id=base, root=base, max_model_len=max_len), *presets,
                           *adapters])
