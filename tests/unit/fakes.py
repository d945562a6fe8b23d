"""Test doubles for unit tests of logic: a deterministic engine, a toy tokenizer and scorers.

They implement the same protocols as the real parts (decoding.Engine, decoding.Scorer) and
record what happened (requests started, finished, cancelled) so tests can assert no leaks.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from decoding.protocols import DecodeContext, Sample, SampleDelta, Sampling

WORDS = ["good", "bad", "nice", "darn", "great", "ok", "fine", "meh"]


class FakeTokenizer:
    """Word-level tokenizer over WORDS plus the prompt's own words."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {w: i for i, w in enumerate(WORDS)}

    def __len__(self) -> int:
        return 10_000

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        if messages[0]["role"] == "assistant":
            raise ValueError("conversation must not start with the assistant")
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        inv = {i: w for w, i in self.vocab.items()}
        return "".join(" " + inv.get(i, "?") for i in ids)  # every token carries its space


class FakeEngine:
    """Samples words uniformly (logprob log 1/8 each); `gate` can hold requests open."""

    def __init__(self, seed: int = 0, max_model_len: int = 512, full_length: bool = False) -> None:
        self.full_length = full_length  # never stop early: every sample runs to max_tokens
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.rng = random.Random(seed)
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.active = 0
        self.calls: list[tuple[list[int], int, Sampling]] = []
        self.gate: asyncio.Event | None = None  # when set-able, requests wait for it

    def num_unfinished_requests(self) -> int:
        return self.active

    @property
    def aborted(self) -> int:
        return self.cancelled

    def _sample(self, max_tokens: int) -> Sample:
        length = max_tokens if self.full_length else self.rng.randint(1, max_tokens)
        ids = [self.rng.randrange(len(WORDS)) for _ in range(length)]
        return Sample(ids, "".join(" " + WORDS[i] for i in ids), [math.log(1 / 8)] * length,
                      "stop" if length < max_tokens else "length")

    async def generate(self, prompt_ids, n: int, sampling: Sampling) -> list[Sample]:
        self.calls.append((list(prompt_ids), n, sampling))
        self.started += 1
        self.active += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            out = [self._sample(sampling.max_tokens) for _ in range(n)]
            self.finished += 1
            return out
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def stream(self, prompt_ids, n: int, sampling: Sampling):
        for i, s in enumerate(await self.generate(prompt_ids, n, sampling)):
            for k, tok in enumerate(s.token_ids):
                last = k == len(s.token_ids) - 1
                yield SampleDelta(i, [tok], " " + WORDS[tok], [s.logprobs[k]],
                                  s.finish_reason if last else None)


class WordReward:
    """Reward = count of `word` in the response (hand-checkable)."""

    def __init__(self, word: str = "good", name: str = "good_count") -> None:
        self.word, self.name = word, name

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return [float(r.split().count(self.word)) for r in responses]


class FixedScores:
    """Returns pre-set scores in order (for selection tests)."""

    def __init__(self, values: Sequence[float], name: str = "fixed") -> None:
        self.values, self.name = list(values), name

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return self.values[: len(responses)]


class Exploding:
    name = "exploding"

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        raise RuntimeError("scorer failed")


def make_app(engine: FakeEngine | None = None, **overrides):
    """The real app factory around the fakes, with tight limits to test them."""
    from server.app import build_app
    from server.scorers import ScorerRegistry
    from server.serving import Runtime
    from server.settings import Settings

    engine = engine or FakeEngine()
    scorers = ScorerRegistry({"good_count": WordReward, "bad_count": lambda: WordReward("bad", "bad_count"),
                              "fixed": lambda: FixedScores([3, 1, 2, 0] * 16),
                              "exploding": Exploding}, None)
    settings = Settings(default_reward="good_count", max_n=16, max_choices=4,
                        max_tokens_limit=64, max_prompt_tokens=40, **overrides)
    runtime = Runtime(engine=engine, scorers=scorers, ctx=DecodeContext(engine), model_name="fake")
    return build_app(settings, runtime, registry=CollectorRegistry())
