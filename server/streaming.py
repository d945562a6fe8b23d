"""Server-sent events for /v1/chat/completions and /v1/completions with `stream: true`.

Plain sampling streams tokens as the engine makes them. Strategies that commit text before they
finish (`streams_text`: blockwise / tokenwise controlled decoding) stream each committed piece
as they call `DecodeRequest.emit`. Other aligned strategies stream the chosen answer once
selected. `alignment` comes in the last chunk of each choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from decoding.protocols import DecodeResult, Sample

from . import tracing
from .errors import APIError, error_json, to_api_error
from .protocol import AlignmentInfo, Usage

if TYPE_CHECKING:
    from .serving import Answer, Prepared


class StreamingMixin:
    """The SSE half of `CompletionService` (it provides rt, metrics, answers, _info, _usage)."""

    async def stream(self, prep: Prepared, t0: float) -> AsyncIterator[str]:
        """SSE events. Plain sampling streams tokens as the engine makes them; aligned
        strategies stream the chosen answer once selected, with `alignment` in the last chunk.
        The role chunk goes out at once; while a strategy is still choosing, comment
        keep-alives go out every `sse_keepalive_s` so idle-timeout proxies keep the stream."""
        chunk = _Chunker(prep, self.rt.model_name, _Timing(self.metrics, prep, t0))
        try:
            if prep.kind == "chat":
                for i in range(len(prep.prompts) * prep.choices):
                    yield chunk.sse(i, {"role": "assistant", "content": ""})
            elif prep.echo:
                for i in range(len(prep.prompts) * prep.choices):
                    yield chunk.sse(i, {"content": prep.prompts[i // prep.choices].echo})
            if prep.strategy.streams_tokens and prep.objective is None:
                answers = []
                # aclosing: when this stream is closed at a `yield` (client gone), close the
                # inner one now, so its `finally` aborts engine work at once, not at GC time.
                async with contextlib.aclosing(self._stream_plain(prep, chunk, answers)) as events:
                    async for event in events:
                        yield event
            elif getattr(prep.strategy, "streams_text", False):
                answers = []
                async with contextlib.aclosing(
                        self._stream_committed(prep, chunk, answers)) as events:
                    async for event in events:
                        yield event
            else:
                answers = []
                async with contextlib.aclosing(self._keep_alive(self.answers(prep), answers)) \
                        as events:
                    async for event in events:
                        yield event
                for a in answers:
                    yield chunk.sse(a.index, {"content": a.result.sample.text},
                                    logprobs=self.logprobs(prep, a.result.sample,
                                                           len(self.echoed(prep, a))))
            total_s = time.perf_counter() - t0
            for a in answers:
                info = self._info(prep, a.result, total_s)
                # streamed pieces carry no log-probs: all of the answer's come with its end
                lps = (self.logprobs(prep, a.result.sample, len(self.echoed(prep, a)))
                       if getattr(prep.strategy, "streams_text", False) else None)
                yield chunk.sse(a.index, {}, finish_reason=finish_reason(a), alignment=info,
                                logprobs=lps)
            if prep.include_usage:
                yield chunk.usage(self._usage(prep, answers))
            self.note_answers(prep, answers)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # headers are sent: report in-band, then end the stream
            yield self.error_event(to_api_error(exc))
        yield "data: [DONE]\n\n"

    async def _keep_alive(self, work, out: list) -> AsyncIterator[str]:
        """Await `work`, yielding SSE comments every `sse_keepalive_s` until it is done; its
        result is appended to `out`. Closing this generator cancels the work."""
        every = self.settings.sse_keepalive_s or None
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=every)
                if done:
                    break
                yield KEEP_ALIVE
            out.extend(task.result())
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def error_event(self, err: APIError) -> str:
        """An error after the headers went out: counted, then sent as an SSE event."""
        self.metrics.errors.labels(err.type, str(err.status)).inc()
        return f"data: {_json(error_json(err))}\n\n"

    async def _stream_plain(self, prep: Prepared, chunk: _Chunker, answers: list[Answer]):
        from .serving import Answer  # serving imports this module at load time

        for pi, prompt in enumerate(prep.prompts):
            samples = [Sample([], "", [], None) for _ in range(prep.choices)]
            t0 = time.perf_counter()
            async for d in self.rt.engine.stream(prompt.ids, prep.choices, prep.sampling):
                s = samples[d.index]
                start = len(s.token_ids)
                s.token_ids += d.token_ids
                s.text += d.text
                s.logprobs += d.logprobs
                if d.top_logprobs is not None:
                    s.top_logprobs = (s.top_logprobs or []) + d.top_logprobs
                s.finish_reason = d.finish_reason
                if d.text or (prep.logprobs and d.token_ids):
                    offset = len(prompt.echo if prep.echo else "") + len(s.text) - len(d.text)
                    yield chunk.sse(pi * prep.choices + d.index, {"content": d.text},
                                    logprobs=self.logprobs(prep, s, offset, start))
            for c, s in enumerate(samples):
                r = DecodeResult(strategy="none", n=1, sample=s, generated_tokens=len(s.token_ids),
                                 win_rate_bound=0.5)
                r.timer.generate_s = time.perf_counter() - t0
                answers.append(Answer(pi * prep.choices + c, prompt, r))
                self.metrics.observe_answer("none", r)


    async def _stream_committed(self, prep: Prepared, chunk: _Chunker, answers: list[Answer]):
        """Run the strategies and relay their committed pieces as they come. If this generator
        is cancelled or closed (client gone, timeout), the `finally` cancels the strategies,
        which aborts their engine requests; a strategy's failure cancels its siblings
        (`answers`) and is raised here after the pieces sent before it."""
        pieces: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        work = asyncio.ensure_future(
            self.answers(prep, emit=lambda index, text: pieces.put_nowait((index, text))))
        try:
            every = self.settings.sse_keepalive_s or None
            while not work.done():
                get = asyncio.ensure_future(pieces.get())
                try:
                    done, _ = await asyncio.wait({get, work}, timeout=every,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not get.done():
                        get.cancel()
                if not done:
                    yield KEEP_ALIVE
                elif get.done() and not get.cancelled():
                    index, text = get.result()
                    yield chunk.sse(index, {"content": text})
            while not pieces.empty():  # committed just before the strategies returned
                index, text = pieces.get_nowait()
                yield chunk.sse(index, {"content": text})
            answers.extend(work.result())
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work


def finish_reason(a: Answer) -> str:
    return a.result.sample.finish_reason or "length"


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see traffic


class _Timing:
    """User-visible time to first token and inter-token latency of one stream."""

    def __init__(self, metrics, prep: Prepared, t0: float) -> None:
        self.t0, self.last = t0, None
        labels = (prep.strategy_name, prep.model, prep.policy)
        self.ttft = metrics.time_to_first_token.labels(*labels)
        self.itl = metrics.inter_token_latency.labels(*labels)

    def text(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.ttft.observe(now - self.t0)
            record = tracing.current()
            if record is not None:
                record.first_token_s = now - self.t0
        else:
            self.itl.observe(now - self.last)
        self.last = now


class _Chunker:
    """Formats OpenAI stream chunks for one request."""

    def __init__(self, prep: Prepared, model: str, timing: _Timing | None = None) -> None:
        self.prep, self.model, self.created = prep, model, int(time.time())
        self.timing = timing
        chat = prep.kind == "chat"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{prep.request_id}"
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _envelope(self, choices: list[dict]) -> dict:
        env = {"id": self.id, "object": self.object, "created": self.created,
               "model": self.model, "choices": choices}
        if self.prep.include_usage:
            env["usage"] = None
        return env

    def sse(self, index: int, delta: dict, finish_reason: str | None = None,
            alignment: AlignmentInfo | None = None, logprobs: BaseModel | None = None) -> str:
        lps = logprobs.model_dump() if logprobs is not None else None
        if self.prep.kind == "chat":
            choice: dict = {"index": index, "delta": delta, "logprobs": lps,
                            "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta.get("content", ""), "logprobs": lps,
                      "finish_reason": finish_reason}
        if delta.get("content") and self.timing is not None:
            self.timing.text()
        env = self._envelope([choice])
        if alignment is not None:
            choice["alignment"] = alignment.model_dump()
            env["alignment"] = choice["alignment"]
        return f"data: {_json(env)}\n\n"

    def usage(self, usage: Usage) -> str:
        env = self._envelope([])
        env["usage"] = usage.model_dump()
        return f"data: {_json(env)}\n\n"
