"""HTTP routes as APIRouters; `build_app` (server/app.py) includes `ROUTERS`.

Handlers are thin: they read the objects `build_app` put on `app.state` and call them.
"""

from ..policies import router as policies
from .openai import router as openai
from .ops import router as ops
from .tokenizer import router as tokenizer

ROUTERS = (openai, tokenizer, ops, policies)

__all__ = ["ROUTERS"]
