"""Prometheus metrics, named `alignserve:*` in vLLM's style and labelled by strategy.

Metrics live on a registry passed in (the process-wide default in production, so vLLM's own
`vllm:*` metrics are served from the same /metrics; a fresh one per app in unit tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from runtime.circuit import STATES

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)
_KL_BUCKETS = (0.0, 0.1, 0.25, 0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        s = ("strategy",)
        self.requests = Counter("alignserve:requests", "Requests served.", s + ("endpoint",),
                                registry=registry)
        self.errors = Counter("alignserve:errors", "Error responses by type.",
                              ("type", "status"), registry=registry)
        self.latency = Histogram("alignserve:request_latency_seconds", "Total request latency.",
                                 s, buckets=_LATENCY_BUCKETS, registry=registry)
        self.generate_latency = Histogram(
            "alignserve:generate_latency_seconds", "Time spent generating, per answer.", s,
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.score_latency = Histogram(
            "alignserve:score_latency_seconds", "Time spent scoring, per answer.", s,
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.generated_tokens = Counter("alignserve:generated_tokens", "Tokens the engine "
                                        "generated (all candidates).", s, registry=registry)
        self.candidates = Counter("alignserve:candidates", "Candidates scored.", s,
                                  registry=registry)
        self.chosen_reward = Histogram(
            "alignserve:chosen_reward", "Reward of the returned answer.", s,
            buckets=(-2, -1, -0.5, -0.25, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 2, 5),
            registry=registry)
        self.kl_bound = Histogram("alignserve:kl_bound", "KL upper bound per answer.", s,
                                  buckets=_KL_BUCKETS, registry=registry)
        self.kl_estimate = Histogram("alignserve:kl_estimate", "KL estimate per answer.", s,
                                     buckets=_KL_BUCKETS, registry=registry)
        self.in_flight = Gauge("alignserve:requests_in_flight", "Requests being served.",
                               registry=registry)
        self.draining = Gauge("alignserve:draining", "1 while the server drains before "
                              "stopping (it refuses new requests), else 0.", registry=registry)
        self.policy_active = Gauge("alignserve:policy_active", "1 for the policy serving "
                                   "requests, 0 for other registered ones.", ("policy",),
                                   registry=registry)
        self.policy_swaps = Counter("alignserve:policy_swaps", "Policy swaps by outcome: ok, "
                                    "rejected (invalid checkpoint), timeout (requests did not "
                                    "finish), failed (reload error).", ("outcome",),
                                    registry=registry)
        self.policy_swapping = Gauge("alignserve:policy_swapping", "1 while a policy swap holds "
                                     "new requests at the gate.", registry=registry)
        self.policy_swap_seconds = Histogram("alignserve:policy_swap_seconds", "Duration of "
                                             "successful swaps (drain + reload).",
                                             buckets=_LATENCY_BUCKETS, registry=registry)
        # What the client waits for (not per engine request): labelled by model and policy too.
        u = ("strategy", "model", "policy")
        self.time_to_first_token = Histogram(
            "alignserve:time_to_first_token_seconds", "From request arrival to the first answer "
            "text the client receives (non-streamed: the whole response).", u,
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "alignserve:inter_token_latency_seconds", "Streams: time between two chunks of "
            "answer text the client receives.", u,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=registry)
        self._registry = registry

    def watch_engine(self, engine) -> None:
        """Expose the engine's own counts (read at scrape time)."""
        self._registry.register(_EngineCollector(engine))

    def watch_capacity(self, admission, gate) -> None:
        """Expose the admission slots and policy leases held (read at scrape time): both are 0
        on an idle server, so a leak shows (the soak, scripts/soak.py, checks them)."""
        self._registry.register(_CapacityCollector(admission, gate))

    def watch_remote_scorers(self, scorers) -> None:
        """Expose the HTTP outcomes of `remote:NAME` scorers (read at scrape time)."""
        self._registry.register(_RemoteScorerCollector(scorers))

    def observe_answer(self, strategy: str, result) -> None:
        """Record one `decoding.DecodeResult`."""
        self.generate_latency.labels(strategy).observe(result.timer.generate_s)
        if result.scored_candidates:
            self.score_latency.labels(strategy).observe(result.timer.score_s)
        self.generated_tokens.labels(strategy).inc(result.generated_tokens)
        self.candidates.labels(strategy).inc(result.scored_candidates)
        if result.reward is not None:
            self.chosen_reward.labels(strategy).observe(result.reward)
        if result.kl_bound is not None:
            self.kl_bound.labels(strategy).observe(result.kl_bound)
        if result.kl_estimate is not None:
            self.kl_estimate.labels(strategy).observe(result.kl_estimate)


class _EngineCollector:
    """Scrape-time view of the engine: unfinished requests (vLLM's count) and aborts we issued."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def collect(self):
        yield GaugeMetricFamily("alignserve:engine_requests_unfinished",
                                "Engine requests not yet finished (vLLM's count).",
                                value=self._engine.num_unfinished_requests())
        yield CounterMetricFamily("alignserve:engine_aborts",
                                  "Engine requests aborted before finishing (client gone, "
                                  "sibling failed, rejected).", value=self._engine.aborted)


class _CapacityCollector:
    """Scrape-time view of what requests hold: admission slots (server/serving/admission.py)
    and policy leases and gate queue (server/policy/gate.py)."""

    def __init__(self, admission, gate) -> None:
        self._admission, self._gate = admission, gate

    def collect(self):
        yield GaugeMetricFamily("alignserve:admission_slots_held", "Admission slots held "
                                "(generation and /tokenize requests).",
                                value=self._admission.active)
        yield GaugeMetricFamily("alignserve:policy_leases_held", "Policy leases held (requests "
                                "running on the active policy's weights).", value=self._gate.held)
        yield GaugeMetricFamily("alignserve:policy_gate_queued", "Requests queued at a closed "
                                "policy gate (during a swap).", value=self._gate.queued)


class _RemoteScorerCollector:
    """Remote reward model servers (runtime/remote_scorer.py): HTTP requests by outcome (ok,
    timeout, unreachable, server_error, rejected, bad_answer, deadline, circuit_open),
    retries, score-call time, and each one's circuit breaker."""

    def __init__(self, scorers) -> None:
        self._scorers = scorers  # a ScorerRegistry

    def collect(self):
        requests = CounterMetricFamily("alignserve:remote_scorer_requests", "HTTP requests to "
                                       "remote reward models by outcome.",
                                       labels=("scorer", "outcome"))
        retries = CounterMetricFamily("alignserve:remote_scorer_retries", "Retried HTTP "
                                      "requests to remote reward models.", labels=("scorer",))
        seconds = CounterMetricFamily("alignserve:remote_scorer_seconds", "Wall time of remote "
                                      "score calls (one per scored batch).", labels=("scorer",))
        calls = CounterMetricFamily("alignserve:remote_scorer_calls", "Remote score calls.",
                                    labels=("scorer",))
        state = GaugeMetricFamily("alignserve:remote_scorer_circuit_state", "Circuit breaker "
                                  "of a remote reward model (runtime/circuit.py): 0 closed, "
                                  "1 open (calls fail fast), 2 half-open (one probe).",
                                  labels=("scorer",))
        opened = CounterMetricFamily("alignserve:remote_scorer_circuit_opened", "Times the "
                                     "circuit breaker opened.", labels=("scorer",))
        refused = CounterMetricFamily("alignserve:remote_scorer_circuit_refused", "Score calls "
                                      "refused (503) while the breaker was open.",
                                      labels=("scorer",))
        for scorer in self._scorers.remote():
            st = scorer.stats
            for outcome, count in sorted(st.requests.items()):
                requests.add_metric((scorer.name, outcome), count)
            retries.add_metric((scorer.name,), st.retries)
            seconds.add_metric((scorer.name,), st.seconds)
            calls.add_metric((scorer.name,), st.calls)
            breaker = getattr(scorer, "breaker", None)
            if breaker is not None:
                state.add_metric((scorer.name,), STATES.index(breaker.state))
                opened.add_metric((scorer.name,), breaker.opened)
                refused.add_metric((scorer.name,), breaker.refused)
        yield from (requests, retries, seconds, calls, state, opened, refused)
