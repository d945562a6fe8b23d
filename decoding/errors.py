"""What an engine raises that the server maps to an HTTP status (server/errors.py): a
parameter it refuses (400) or the engine being gone (503)."""

from __future__ import annotations


class EngineRejected(ValueError):
    """The engine refused a request's parameters (a client error: the server answers 400).
    `param` names the request field when the engine said which."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineUnavailable(RuntimeError):
    """The engine cannot serve now (its worker died, or it is restarting): the server answers
    503 with Retry-After, so clients and load balancers go elsewhere."""
