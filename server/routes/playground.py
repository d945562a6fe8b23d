"""The playground (a static page at /playground) and the strategy catalogue it builds its form
from (`GET /v1/alignment/strategies`).

The page is three static files shipped in the package (server/static/): no CDN, no inline
script or style, so it is served under a strict Content-Security-Policy. It holds no data and
needs no key (AuthGate gates only /v1, /admin and the tokenizer routes); every call it makes
goes to /v1 with the key the user types, as any client's would. `playground: false` answers
the page's paths with 404.

The catalogue lists every registered strategy with the JSON schema of its own `Options`
(decoding/strategies.py), so a new strategy appears in the page without page changes. It is
under /v1 (it names the server's scorers), so it needs the key like every /v1 route.
"""

from __future__ import annotations

import sys
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from decoding.strategies import STRATEGIES

from ..errors import APIError, error_responses
from ..protocol import AlignmentBase

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
# URL path -> (file in server/static, media type). A fixed table: no path from the request
# ever reaches the file system.
ASSETS = {"/playground": ("playground.html", "text/html; charset=utf-8"),
          "/playground/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/playground/trace.js": ("trace.js", "text/javascript; charset=utf-8"),
          "/playground/snippets.js": ("snippets.js", "text/javascript; charset=utf-8"),
          "/playground/app.css": ("app.css", "text/css; charset=utf-8")}

router = APIRouter()


def _asset(request: Request) -> Response:
    if not request.app.state.settings.playground:
        raise APIError(404, "the playground is turned off on this server (setting "
                       "`playground`)", code="not_found")
    name, media = ASSETS[request.scope["route"].path]
    body = resources.files("server").joinpath("static", name).read_bytes()
    return Response(body, media_type=media, headers=HEADERS)


for _path in ASSETS:
    router.add_api_route(_path, _asset, methods=["GET"], include_in_schema=False)


class StrategyEntry(BaseModel):
    name: str
    description: str = Field(description="The first line of the strategy's docstring.")
    options: dict[str, Any] = Field(description="JSON schema of the strategy's own "
                                    "`alignment` fields (its `Options`).")
    needs_objective: bool = Field(description="It scores candidates with a reward (default: "
                                  "the server's).")
    takes_value: bool = Field(description="It accepts `alignment.value`.")
    value_required: bool
    streams: str = Field(description="'tokens' (streamed as sampled), 'text' (committed "
                         "pieces streamed as chosen) or 'answer' (sent when chosen).")


class StrategyCatalogue(BaseModel):
    object: str = "list"
    common: dict[str, Any] = Field(description="JSON schema of the `alignment` fields every "
                                   "strategy takes.")
    default_reward: str
    scorers: list[str] = Field(description="Scorer names for reward, cost and value.")
    data: list[StrategyEntry]


def _entry(name: str, s) -> StrategyEntry:
    # the class docstring, else its module's (a strategy module's docstring opens with its name)
    doc = (type(s).__doc__ or sys.modules[type(s).__module__].__doc__ or "").strip().splitlines()
    return StrategyEntry(name=name, description=doc[0] if doc else "",
                         options=s.Options.model_json_schema(by_alias=True),
                         needs_objective=s.traits.needs_objective,
                         takes_value=s.traits.value_protocol is not None,
                         value_required=s.traits.value_required, streams=s.traits.streams)


@router.get("/v1/alignment/strategies", response_model=StrategyCatalogue, tags=["alignment"],
            responses=error_responses(401))
async def strategies(request: Request) -> StrategyCatalogue:
    """Every registered strategy with the schema of its options (the playground's form)."""
    st = request.app.state
    common = AlignmentBase.model_json_schema()
    return StrategyCatalogue(common=common, default_reward=st.settings.default_reward,
                             scorers=[n for n in st.runtime.scorers.names()
                                      if not n.startswith("hf:")],
                             data=[_entry(name, s) for name, s in STRATEGIES.items()])
