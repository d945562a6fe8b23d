"""HTTP routes as APIRouters; `build_app` (server/app.py) includes `ROUTERS`.

Handlers are thin: they read the objects `build_app` put on `app.state` and call them.
"""

from .lora import router as lora
from .openai import router as openai
from .ops import router as ops
from .playground import router as playground
from .policies import router as policies
from .responses import router as responses
from .tokenizer import router as tokenizer

ROUTERS = (openai, responses, tokenizer, ops, policies, lora, playground)

__all__ = ["ROUTERS"]
