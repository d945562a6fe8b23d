"""Two ways to get an answer to a (prompt, setting, seed), behind one small interface (`Runner`).

- `InProcessRunner`: the strategies from the registry run in this process on a `Runtime`
  (engine + scorer registry + DecodeContext), exactly as the server runs them but without HTTP.
  `start_in_process` builds that runtime on the vLLM engine (`runtime.startup.build_runtime`);
  unit tests hand it fakes instead. vLLM spawns worker processes, so whatever calls it must sit
  under an `if __name__ == "__main__":` guard (the `alignserve` script and `python -m evaluation` do).
- `HttpRunner`: a running alignserve server, through `/v1/chat/completions` with the `alignment`
  extension (see docs/api.md); everything it reports comes from the response's `alignment` block.

Both send the prompt as one user chat message; the scorers see the prompt text itself.
With a panel (`RunConfig.panel`, `--panel`) both also ask for the answer's candidates and
return its distortion terms (evaluation/panel.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES, option_keys, options_for
from decoding.types import Sampling
from runtime.prompts import PromptItem, chat_prompt_ids
from runtime.protocols import Runtime
from runtime.settings import EngineSettings

from .panel import Member, answer_terms, candidate_set
from .plan import Setting


class EvalError(RuntimeError):
    """A request of the evaluation failed; the message says which and why."""


@dataclass(frozen=True)
class RunConfig:
    """What every setting shares: sampling budget and the objective the strategies select by."""

    max_tokens: int
    reward: str
    cost: str | None = None
    cost_weight: float = 1.0
    soft_temperature: float = 1.0  # soft best-of-n λ (DecodeRequest.temperature)
    temperature: float = 1.0  # sampling temperature of the policy
    panel: tuple[Member, ...] = ()  # users the distortion is measured over (none: not measured)


@dataclass
class Answer:
    text: str
    reward: float | None
    cost: float | None
    kl_bound: float
    kl_estimate: float | None
    generated_tokens: int
    wall_s: float
    # (best, achieved) average normalised panel utility of the candidates and of the answer
    # (evaluation/panel.py); None without a panel or without candidates to measure over
    panel_terms: tuple[float, float] | None = None


class Runner(Protocol):
    model_name: str

    async def answer(self, item: PromptItem, setting: Setting, seed: int | None = None
                     ) -> Answer: ...

    async def aclose(self) -> None: ...


class InProcessRunner:
    """Strategies from the registry on a `runtime.protocols.Runtime`."""

    def __init__(self, runtime: Runtime, cfg: RunConfig, owns_runtime: bool = False) -> None:
        self.rt, self.cfg, self._owns = runtime, cfg, owns_runtime
        self.model_name = runtime.model_name
        self._objective: Objective | None = None
        self._panel: list = []  # the panel's scorers, loaded by start()

    async def start(self) -> InProcessRunner:
        """Load the scorers once (in a worker thread: model loading is slow)."""
        reward = await self.rt.scorers.get(self.cfg.reward)
        cost = await self.rt.scorers.get(self.cfg.cost) if self.cfg.cost else None
        self._objective = Objective(reward=reward, cost=cost, cost_weight=self.cfg.cost_weight)
        self._panel = [await self.rt.scorers.get(m.name) for m in self.cfg.panel]
        return self

    async def answer(self, item: PromptItem, setting: Setting, seed: int | None = None) -> Answer:
        assert self._objective is not None, "call start() first"
        req = DecodeRequest(
            prompt_ids=chat_prompt_ids(self.rt.engine.tokenizer, item.prompt, item.prefill),
            prompt_text=item.prompt,
            sampling=Sampling(max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                              seed=seed),
            n=setting.n, objective=self._objective, return_candidates=bool(self.cfg.panel),
            options=options_for(setting.strategy, {"selection_temperature": self.cfg.soft_temperature,
                                                   **setting.options}))
        t0 = time.perf_counter()
        r = await STRATEGIES[setting.strategy].run(req, self.rt.ctx)
        wall = time.perf_counter() - t0
        terms = None
        if self.cfg.panel and (r.candidates is not None or setting.n == 1):
            finished = [c.sample for c in r.candidates or [] if c.sample.finish_reason]
            pool, chosen = candidate_set(finished, r.sample, lambda s: s.text)
            terms = await answer_terms(self.cfg.panel, self._panel, chosen,
                                       lambda scorer: self.rt.ctx.score(scorer, req, pool))
        return Answer(r.sample.text, r.reward, r.cost, r.kl_bound, r.kl_estimate,
                      r.generated_tokens, wall, terms)

    async def aclose(self) -> None:
        if self._owns:
            self.rt.close()


async def start_in_process(settings: EngineSettings, cfg: RunConfig) -> InProcessRunner:
    """Start the vLLM engine and scorers of `settings`; the runner's `aclose` stops them.
    Must run inside the event loop: AsyncLLM binds to the running loop."""
    from runtime.startup import build_runtime  # torch and vllm: kept off the CLI parser's path

    runner = InProcessRunner(build_runtime(settings), cfg, owns_runtime=True)
    try:
        return await runner.start()
    except BaseException:  # an unknown scorer, say: do not leave the engine running
        await runner.aclose()
        raise


class HttpRunner:
    """A running alignserve server. `client` (an httpx.AsyncClient) may be given for tests."""

    def __init__(self, base_url: str, cfg: RunConfig, api_key: str | None = None,
                 timeout_s: float = 600.0, client: Any = None, panel_scorers: Any = None) -> None:
        """`panel_scorers`: a local scorer registry (runtime.scorers.ScorerRegistry) for the
        panel's members: the server returns the candidates' texts, this process scores them."""
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.cfg = cfg
        self._client = client or httpx.AsyncClient(base_url=base_url.rstrip("/"),
                                                   timeout=timeout_s, headers=headers)
        self.model_name = "?"
        self._registry, self._panel = panel_scorers, []

    async def start(self) -> HttpRunner:
        r = await self._client.get("/v1/models")
        self._check(r, "GET /v1/models")
        self.model_name = r.json()["data"][0]["id"]
        if self.cfg.panel:
            if self._registry is None:
                raise ValueError("--panel over HTTP needs a local scorer registry")
            self._panel = [await self._registry.get(m.name) for m in self.cfg.panel]
        return self

    def _body(self, item: PromptItem, setting: Setting, seed: int | None = None) -> dict:
        # only the options this strategy declares: the server refuses another strategy's
        options = {"selection_temperature": self.cfg.soft_temperature, **setting.options}
        keys = option_keys(setting.strategy)
        alignment = {"strategy": setting.strategy, "n": setting.n, "reward": self.cfg.reward,
                     "cost": self.cfg.cost, "cost_weight": self.cfg.cost_weight,
                     **{k: v for k, v in options.items() if k in keys},
                     **({"return_candidates": True} if self.cfg.panel else {})}
        messages = [{"role": "user", "content": item.prompt}]
        prefill = {}
        if item.prefill:  # the API's assistant prefill (docs/api.md)
            messages.append({"role": "assistant", "content": item.prefill})
            prefill = {"add_generation_prompt": False, "continue_final_message": True}
        body = {"model": self.model_name, "messages": messages,
                "max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature,
                "alignment": alignment, **prefill}
        return body if seed is None else {**body, "seed": seed}

    async def answer(self, item: PromptItem, setting: Setting, seed: int | None = None) -> Answer:
        t0 = time.perf_counter()
        r = await self._client.post("/v1/chat/completions", json=self._body(item, setting, seed))
        wall = time.perf_counter() - t0
        self._check(r, f"{setting.label} on prompt {item.id}")
        body = r.json()
        a = body["choices"][0].get("alignment") or body.get("alignment")
        if a is None:
            raise EvalError(f"{setting.label} on prompt {item.id}: no `alignment` in the response")
        text = body["choices"][0]["message"]["content"]
        terms = None
        if self.cfg.panel and (a.get("candidates") is not None or setting.n == 1):
            finished = [c["text"] for c in a.get("candidates") or [] if c.get("finish_reason")]
            pool, chosen = candidate_set(finished, text, str)

            async def score(scorer) -> list[float]:
                return [float(v) for v in await asyncio.to_thread(scorer.score, item.prompt,
                                                                  pool)]

            terms = await answer_terms(self.cfg.panel, self._panel, chosen, score)
        return Answer(text, a.get("reward"), a.get("cost"), a["kl_bound"], a.get("kl_estimate"),
                      a["generated_tokens"], wall, terms)

    @staticmethod
    def _check(r, what: str) -> None:
        if r.status_code == 200:
            return
        try:
            message = r.json()["error"]["message"]
        except Exception:  # not OpenAI-shaped (a proxy's page, ...): show the start of it
            message = r.text[:300]
        raise EvalError(f"{what}: HTTP {r.status_code}: {message}")

    async def aclose(self) -> None:
        await self._client.aclose()
