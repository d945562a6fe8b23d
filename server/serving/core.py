"""What both endpoints do once a request is resolved: run its strategy, or stream it.

One `DecodeRequest` per (prompt, choice), run concurrently by the request's strategy (one
failure cancels the rest). Streaming relays what the strategy hands out while it runs, chosen
by the strategy's `Traits.streams` (decoding/strategies.py):

- "tokens" without an objective (plain sampling): each engine delta (`on_delta`), with
  its tokens' log-probs;
- "text" (controlled decoding): each committed piece (`emit`), log-probs at the end;
- otherwise the chosen answer once selected, with comment keep-alives while it is chosen.

`alignment` comes in the last chunk of each choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from decoding.concurrency import gather_all
from decoding.request import DecodeRequest
from decoding.seeds import choice_seed
from decoding.types import Sample, SampleDelta
from runtime.protocols import Runtime

from ..constraint import load_dual
from ..errors import APIError, to_api_error
from ..lifecycle import Lifecycle
from ..logprobs import TokenText
from ..observability import request_ids
from ..observability.metrics import Metrics
from ..policy.manager import PolicyManager
from ..settings import Settings
from . import render
from .admission import Admission
from .data import Answer, ResolvedRequest
from .resolve import RequestResolver

Piece = str | SampleDelta  # a committed piece of text (`emit`) or an engine delta (`on_delta`)


class ServingCore:
    """Shared by the chat and completions serving objects (one per server)."""

    def __init__(self, settings: Settings, runtime: Runtime, metrics: Metrics,
                 admission: Admission, lifecycle: Lifecycle, policies: PolicyManager) -> None:
        self.settings, self.rt, self.metrics = settings, runtime, metrics
        self.admission, self.lifecycle, self.policies = admission, lifecycle, policies
        self.resolver = RequestResolver(settings, runtime, load_dual(settings.dual))
        self.resolve = self.resolver.resolve
        self._token_text: TokenText | None = None

    @property
    def token_text(self) -> TokenText:
        """Token strings for logprobs (memoised; made on first use)."""
        if self._token_text is None:
            self._token_text = TokenText(self.rt.engine.tokenizer)
        return self._token_text

    # ---------------------------------------------------------------- running strategies

    def decode_requests(self, rr: ResolvedRequest) -> list[tuple[int, DecodeRequest]]:
        """(choice index, its DecodeRequest) for every (prompt, choice)."""
        a = rr.alignment
        # each choice's first engine call draws `children` samples (seeds seed + index)
        children = a.n if a and rr.strategy.traits.needs_objective else 1
        options = a.options() if a else None
        out = []
        for pi, prompt in enumerate(rr.prompts):
            for c in range(rr.choices):
                seed = choice_seed(rr.sampling.seed, c, children)
                sampling = dataclasses.replace(rr.sampling, seed=seed)
                out.append((pi * rr.choices + c, DecodeRequest(
                    prompt_ids=prompt.ids, prompt_text=prompt.text, sampling=sampling,
                    n=a.n if a else 1, objective=rr.objective,
                    return_candidates=bool(a and (a.return_candidates or a.trace)), seed=seed,
                    options=options, value=rr.value)))
        return out

    async def answers(self, rr: ResolvedRequest,
                      relay: Callable[[int, Piece], None] | None = None) -> list[Answer]:
        """Run every (prompt, choice) concurrently; one failure cancels the rest. With `relay`,
        what the strategy streams (see the module docstring) goes to `relay(index, piece)`."""
        jobs = self.decode_requests(rr)
        if relay is not None:
            for index, dr in jobs:
                if rr.strategy.traits.streams == "text":
                    dr.emit = functools.partial(relay, index)
                elif rr.strategy.traits.streams == "tokens":
                    dr.on_delta = functools.partial(relay, index)
        results = await gather_all(rr.strategy.run(dr, self.rt.ctx) for _, dr in jobs)
        answers = [Answer(i, rr.prompts[i // rr.choices], r) for (i, _), r in zip(jobs, results)]
        for a in answers:
            self.metrics.observe_answer(rr.strategy_name, a.result)
        return answers

    def note_answers(self, rr: ResolvedRequest, answers: list[Answer]) -> None:
        """What the access log line reports about the answers (the access log:
        server/observability/request_ids.py)."""
        record = request_ids.current()
        if record is None:
            return
        u = render.usage(rr, answers)
        record.prompt_tokens, record.completion_tokens = u.prompt_tokens, u.completion_tokens
        record.generated_tokens = sum(a.result.generated_tokens for a in answers)
        record.generate_s = sum(a.result.timer.generate_s for a in answers)
        record.score_s = sum(a.result.timer.score_s for a in answers)

    def error_event(self, err: APIError) -> str:
        """An error after the headers went out: counted, then sent as an SSE event."""
        self.metrics.errors.labels(err.type, str(err.status)).inc()
        return render.error_event(err)

    # ---------------------------------------------------------------- streaming

    async def stream(self, rr: ResolvedRequest, t0: float) -> AsyncIterator[str]:
        """SSE events. The opening chunks go out at once; while a strategy has nothing to
        send, comment keep-alives go out every `sse_keepalive_s` so idle-timeout proxies keep
        the stream. Errors after the headers are reported in-band."""
        send = _Sender(render.ChunkHead.of(rr, self.rt.model_name),
                       _Timing(self.metrics, rr, t0))
        try:
            for index, delta in render.opening_deltas(rr):
                yield send(index, delta)
            answers: list[Answer] = []
            # tool calls are parsed from the whole answer: streamed as one delta at its end
            live = rr.tools is None and (rr.strategy.traits.streams == "text" or (
                rr.strategy.traits.streams == "tokens" and rr.objective is None))
            # aclosing: when this stream is closed at a `yield` (client gone), close the
            # inner one now, so its `finally` aborts engine work at once, not at GC time.
            async with contextlib.aclosing(self._relay(rr, send, answers, live)) as events:
                async for event in events:
                    yield event
            for a in ([] if live else answers):  # the chosen answers, whole
                yield send(a.index, render.whole_delta(rr, a),
                           tokens=len(a.result.sample.token_ids),
                           lps=self._logprobs(rr, a.result.sample, a))
            total_s = time.perf_counter() - t0
            for a in answers:
                # pieces carry no log-probs: all of the answer's come with its end
                lps = (self._logprobs(rr, a.result.sample, a)
                       if rr.strategy.traits.streams == "text" else None)
                yield send(a.index, {}, finish_reason=render.answer_message(rr, a)[2],
                           alignment=render.alignment_info(rr, a.result, total_s), lps=lps)
            if rr.include_usage:
                yield render.usage_chunk(send.head, render.usage(rr, answers))
            self.note_answers(rr, answers)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # headers are sent: report in-band, then end the stream
            yield self.error_event(to_api_error(exc))
        yield render.DONE

    async def _relay(self, rr: ResolvedRequest, send: _Sender, answers: list[Answer],
                     live: bool) -> AsyncGenerator[str, None]:
        """Run the strategies, relaying their pieces (when `live`) as they come. If this
        generator is closed (client gone, timeout), the `finally` cancels the strategies,
        which aborts their engine requests; a strategy's failure cancels its siblings and is
        raised here after the pieces sent before it."""
        pieces: asyncio.Queue[tuple[int, Piece]] = asyncio.Queue()
        work = asyncio.ensure_future(self.answers(
            rr, relay=(lambda index, piece: pieces.put_nowait((index, piece))) if live else None))
        chars = [0] * rr.answers  # text streamed so far per choice (completions' offsets)
        every = self.settings.sse_keepalive_s or None
        try:
            while True:
                while not pieces.empty():
                    event = self._piece(rr, send, *pieces.get_nowait(), chars)
                    if event is not None:
                        yield event
                if work.done():
                    break
                get = asyncio.ensure_future(pieces.get())
                try:
                    done, _ = await asyncio.wait({get, work}, timeout=every,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not get.done():
                        get.cancel()
                if not done:
                    yield render.KEEP_ALIVE
                elif get.done() and not get.cancelled():
                    event = self._piece(rr, send, *get.result(), chars)
                    if event is not None:
                        yield event
            answers.extend(work.result())
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work

    def _piece(self, rr: ResolvedRequest, send: _Sender, index: int, piece: Piece,
               chars: list[int]) -> str | None:
        """One relayed piece as an SSE event (None: nothing to send)."""
        if isinstance(piece, str):
            return send(index, {"content": piece})
        offset = len(rr.prompts[index // rr.choices].echo if rr.echo else "") + chars[index]
        chars[index] += len(piece.text)
        send.tokens += len(piece.token_ids)  # counted even when no text goes out yet
        if not (piece.text or (rr.logprobs and piece.token_ids)):
            return None
        sample = Sample(piece.token_ids, piece.text, piece.logprobs, None, piece.top_logprobs)
        return send(index, {"content": piece.text},
                    lps=render.logprobs(rr, self.token_text, sample, offset))

    def _logprobs(self, rr: ResolvedRequest, sample: Sample, a: Answer):
        return render.logprobs(rr, self.token_text, sample, len(render.echoed(rr, a)))


class _Sender:
    """Renders chunks of one stream, timing the user-visible text as it goes out."""

    def __init__(self, head: render.ChunkHead, timing: _Timing) -> None:
        self.head, self.timing = head, timing
        self.tokens = 0  # returned tokens sent so far (continuous usage)

    def __call__(self, index: int, delta: dict, tokens: int = 0, **kw) -> str:
        if delta.get("content") or delta.get("tool_calls"):
            self.timing.text()
        self.tokens += tokens
        return render.chunk(self.head, index, delta, completion_tokens=self.tokens, **kw)


class _Timing:
    """User-visible time to first token and inter-token latency of one stream."""

    def __init__(self, metrics: Metrics, rr: ResolvedRequest, t0: float) -> None:
        self.t0 = t0
        self.last: float | None = None
        labels = (rr.strategy_name, rr.model, rr.policy)
        self.ttft = metrics.time_to_first_token.labels(*labels)
        self.itl = metrics.inter_token_latency.labels(*labels)

    def text(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.ttft.observe(now - self.t0)
            record = request_ids.current()
            if record is not None:
                record.first_token_s = now - self.t0
        else:
            self.itl.observe(now - self.last)
        self.last = now
