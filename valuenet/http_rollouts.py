"""`alignserve rollouts --server URL`: the same rollout folder, drawn from a running alignserve
(one replica or a whole fleet behind its Service) through the OpenAI-compatible API instead of
an in-process engine, so value heads and CAN's dual can be fitted on as many samples as the
serving fleet can draw.

Per prompt: `POST /tokenize` (messages, generation prompt) gives `prompt_ids` exactly as the
server's chat path makes them; then one `best_of_n` request with `alignment.n = K`,
`return_candidates` and `logprobs: true`, whose K candidates are the K i.i.d. samples with
their token ids, per-token log-probs and the server's reward and cost (cost_weight 0: the
selection is irrelevant here, only the candidates are kept). Every sampling control is sent
explicitly (top_p 1, no top-k/min-p cut, no penalties), so the server's generation_config
defaults do not change the reference distribution the folder's manifest records.

Scorer names are the server's: `remote:NAME` and `value:NAME` work when that server serves
them. Resumable exactly as the in-process path (valuenet/rollouts.py): the folder's manifest
records the served model name, so a folder can be continued from either.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from decoding.concurrency import gather_all

from .data import Manifest, Rollout
from .rollouts import Stats, record_prompt

# The reference distribution: temperature only, no other control (vLLM's neutral values).
NEUTRAL = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
           "presence_penalty": 0.0, "frequency_penalty": 0.0}


class ServerError(RuntimeError):
    """The server refused or failed a request (the message is its OpenAI error)."""


class RolloutClient:
    """The two calls a rollout needs, on an httpx.AsyncClient (tests pass an ASGI one)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 600.0,
                 client: Any = None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s,
                                                   headers=headers)
        self.model = "?"

    async def start(self) -> RolloutClient:
        self.model = (await self._get("/v1/models"))["data"][0]["id"]
        return self

    async def prompt_ids(self, prompt: str) -> list[int]:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "add_generation_prompt": True, "add_special_tokens": False}
        return list((await self._post("/tokenize", body))["tokens"])

    async def samples(self, prompt: str, cfg) -> list[dict]:
        """The K candidates of one best-of-K request (RolloutConfig `cfg`)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, **NEUTRAL,
                "logprobs": True,
                "alignment": {"strategy": "best_of_n", "n": cfg.n, "reward": cfg.reward,
                              "cost": cfg.cost, "cost_weight": 0.0, "return_candidates": True}}
        out = await self._post("/v1/chat/completions", body)
        candidates = out["choices"][0]["alignment"]["candidates"]
        if len(candidates) != cfg.n or any(c.get("logprobs") is None for c in candidates):
            raise ServerError(f"{self.base_url} returned {len(candidates)} candidates without "
                              "per-token logprobs: is it an older alignserve?")
        return candidates

    async def _get(self, path: str) -> dict:
        return self._check(await self._send("GET", path), path)

    async def _post(self, path: str, body: dict) -> dict:
        return self._check(await self._send("POST", path, json=body), path)

    async def _send(self, method: str, path: str, **kw):
        import httpx

        try:
            return await self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from None

    def _check(self, r, path: str) -> dict:
        if r.status_code == 200:
            return r.json()
        try:
            message = r.json()["error"]["message"]
        except Exception:  # not OpenAI-shaped (a proxy's page): the start of it
            message = r.text[:300]
        raise ServerError(f"{self.base_url}{path}: HTTP {r.status_code}: {message}")

    async def aclose(self) -> None:
        await self._client.aclose()


def server_manifest(client: RolloutClient, prompts: Path, cfg, created: str) -> Manifest:
    return Manifest(model=client.model, prompts=str(prompts), n=cfg.n,
                    max_tokens=cfg.max_tokens, temperature=cfg.temperature, reward=cfg.reward,
                    cost=cfg.cost, created=created,
                    extra={"server": client.base_url, "top_p": 1.0, "chat_template": True})


async def collect_http(client: RolloutClient, prompts: list, cfg, folder: Path,
                       manifest: Manifest, bar: Any = None):
    """`valuenet.rollouts.collect` over HTTP: the same rows, appended one prompt at a time
    (a prompt is complete on disk or absent), `cfg.concurrency` prompts in flight."""
    gate = asyncio.Semaphore(cfg.concurrency)
    stats = Stats()
    t0 = time.perf_counter()

    async def one(item) -> None:
        async with gate:
            ids = await client.prompt_ids(item.prompt)
            candidates = await client.samples(item.prompt, cfg)
        rows = [Rollout(prompt_id=item.id, prompt=item.prompt, prompt_ids=ids, sample=k,
                        token_ids=list(c["token_ids"]), logprobs=list(c["logprobs"]),
                        text=c["text"], finish_reason=c["finish_reason"], reward=c["reward"],
                        cost=c["cost"])
                for k, c in enumerate(candidates)]
        record_prompt(folder, manifest, stats, rows, bar, t0)

    await gather_all(one(p) for p in prompts)
    stats.wall_s = time.perf_counter() - t0
    return stats
