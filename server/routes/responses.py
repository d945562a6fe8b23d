"""OpenAI's Responses API: POST /v1/responses (text and function tools; server/serving/responses.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..errors import OpenAPIResponses, error_responses
from ..protocol import ResponseObject, ResponsesRequest

# Declared in the OpenAPI schema (the fuzz tests hold the app to it).
_RESPONSES: OpenAPIResponses = {**error_responses(400, 401, 404, 413, 429, 500, 503, 504),
              200: {"content": {"text/event-stream": {}},
                    "description": "A response object, or its events with `stream: true`"}}

router = APIRouter(tags=["openai"])


@router.post("/v1/responses", response_model=ResponseObject, responses=_RESPONSES)
async def responses(body: ResponsesRequest, request: Request, response: Response):
    return await request.app.state.responses.create(body, request, response)
