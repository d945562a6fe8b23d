"""Run child coroutines together so that none outlives a failure or a cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def gather_all(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the siblings (a TaskGroup) and is
    raised as itself, not wrapped in an ExceptionGroup, so error tables can map it."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks: list[asyncio.Task[T]] = [tg.create_task(c) for c in coros]
    except ExceptionGroup as group:
        raise group.exceptions[0] from group
    return [t.result() for t in tasks]
