"""Test doubles for unit tests of logic: a deterministic engine, a toy tokenizer and scorers.

They implement the same protocols as the real parts (runtime.protocols.ServingEngine, which
extends decoding.Engine, and decoding.Scorer) and
record what happened (requests started, finished, cancelled) so tests can assert no leaks.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from decoding.context import DecodeContext
from decoding.types import Sample, SampleDelta, Sampling

WORDS = ["good", "bad", "nice", "darn", "great", "ok", "fine", "meh"]
EOS = 9_999  # the fake model's end-of-sequence id (never a word; decodes to nothing)


class FakeTokenizer:
    """Word-level tokenizer over WORDS plus the prompt's own words."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {w: i for i, w in enumerate(WORDS)}

    def __len__(self) -> int:
        return 10_000

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True,
                            continue_final_message=False, **variables):
        """Like HF's: `<role> content` turns; extra template variables appear as `{k=v}`."""
        if messages[0]["role"] == "assistant":
            raise ValueError("conversation must not start with the assistant")
        text = " ".join(f"<{m['role']}> {m['content']}" for m in messages)
        text += "".join(f" {{{k}={v}}}" for k, v in sorted(variables.items()))
        return text + (" <assistant>" if add_generation_prompt else "")

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
        self.eos_token_ids = frozenset({EOS})
        # The policy's next-token log-probs at every position, reported as the top k when a
        # call asks for top_logprobs (the sampled tokens stay uniform over WORDS).
        self.next_logprobs: dict[int, float] = {i: math.log(1 / 8) for i in range(len(WORDS))}
        # Policy hot-swap (server/policy/manager.py): the "weights" are the path last loaded.
        self.model_path: str | None = None
        self.weights: str | None = None
        self.reloads: list[str] = []
        self.reload_gate: asyncio.Event | None = None  # holds reload_weights open
        self.reload_error: Exception | None = None  # raised by the next reload
        self.prefix_resets = 0
        self.adapters: dict[str, str] = {}  # LoRA adapters loaded (name -> folder)
        self.mixed_weights = 0  # generations that saw the weights change under them
        self.child_seeds: list[int] = []  # the seed of every seeded sample drawn, in order
        self.generated_tokens = 0  # tokens of every sample returned, all calls together
        # stream_sequence: one entry per sequence (its seed, tokens produced so far, how it
        # ended: "finished" | "cancelled" | None while it runs), and a hook awaited before
        # every token (tests pace or hold sequences with it).
        self.sequences: list[dict] = []
        self.before_token = None  # async (sequence record) -> None

    # -- runtime.protocols.ServingEngine ---------------------------------------------------
    sampling_defaults: dict = {}  # no generation_config: requests get the neutral values

    def num_unfinished_requests(self) -> int:
        return self.active

    async def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    @property
    def aborted(self) -> int:
        return self.cancelled

    def decode(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos_token_ids])

    def _top(self, k: int) -> dict[int, float]:
        return dict(sorted(self.next_logprobs.items(), key=lambda kv: -kv[1])[:k])

    def _sample(self, max_tokens: int, top_logprobs: int = 0, stop: Sequence[str] = (),
                rng: random.Random | None = None) -> Sample:
        """Like vLLM: a stop string cuts the text and ends the ids at the token completing it."""
        rng = rng or self.rng
        length = max_tokens if self.full_length else rng.randint(1, max_tokens)
        ids = [rng.randrange(len(WORDS)) for _ in range(length)]
        finish = "stop" if length < max_tokens else "length"
        text = "".join(" " + WORDS[i] for i in ids)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            cut = min(hits)
            ids = next(ids[:k] for k in range(1, len(ids) + 1)
                       if any(s in self.decode(ids[:k]) for s in stop))
            text, finish = text[:cut], "stop"
        return Sample(ids, text, [math.log(1 / 8)] * len(ids), finish,
                      [self._top(top_logprobs) for _ in ids] if top_logprobs else None)

    def _child_rng(self, sampling: Sampling, index: int) -> random.Random:
        """vLLM's convention: child i of a seeded request samples with seed + i."""
        if sampling.seed is None:
            return self.rng
        self.child_seeds.append(sampling.seed + index)
        return random.Random(sampling.seed + index)

    async def reload_weights(self, path: str) -> None:
        if self.reload_gate is not None:
            await self.reload_gate.wait()
        if self.reload_error is not None:
            err, self.reload_error = self.reload_error, None
            raise err
        self.weights = path
        self.reloads.append(path)

    async def reset_prefix_cache(self) -> None:
        self.prefix_resets += 1

    lora_enabled = False  # set True to accept LoRA adapters (add_adapter)

    async def add_adapter(self, name: str, path: str) -> None:
        self.adapters[name] = path

    async def remove_adapter(self, name: str) -> None:
        self.adapters.pop(name)

    async def generate(self, prompt_ids, n: int, sampling: Sampling) -> list[Sample]:
        self.calls.append((list(prompt_ids), n, sampling))
        self.started += 1
        self.active += 1
        weights = self.weights
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            out = [self._sample(sampling.max_tokens, sampling.top_logprobs, sampling.stop,
                                self._child_rng(sampling, i)) for i in range(n)]
            self.mixed_weights += weights != self.weights
            self.generated_tokens += sum(len(o.token_ids) for o in out)
            self.finished += 1
            return out
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def stream(self, prompt_ids, sampling: Sampling):
        for i, s in enumerate(await self.generate(prompt_ids, 1, sampling)):
            for k, tok in enumerate(s.token_ids):
                last = k == len(s.token_ids) - 1
                yield SampleDelta(i, [tok], " " + WORDS[tok], [s.logprobs[k]],
                                  s.finish_reason if last else None)


    async def stream_sequence(self, prompt_ids, sampling: Sampling):
        """One sequence, one token per delta, each after a scheduling point (so siblings and
        the strategy interleave as in a real engine's steps). Seeded: its own
        random.Random(seed), so equal seeds give equal sequences and a sequence does not
        depend on its siblings."""
        self.calls.append((list(prompt_ids), 1, sampling))
        self.started += 1
        self.active += 1
        rng = random.Random(sampling.seed if sampling.seed is not None else self.rng.random())
        budget = sampling.max_tokens
        length = budget if self.full_length else rng.randint(1, budget)
        rec = {"seed": sampling.seed, "tokens": 0, "end": None}
        self.sequences.append(rec)
        if sampling.seed is not None:
            self.child_seeds.append(sampling.seed)
        ids: list[int] = []
        sent = 0  # characters of the text already yielded
        try:
            if self.gate is not None:
                await self.gate.wait()
            for k in range(length):
                if self.before_token is not None:
                    await self.before_token(rec)
                await asyncio.sleep(0)
                tok = rng.randrange(len(WORDS))
                ids.append(tok)
                rec["tokens"] += 1
                self.generated_tokens += 1
                text = self.decode(ids)
                hits = [text.find(s) for s in sampling.stop if s in text]
                # as vLLM: a stop string ends the sequence at the token that completes it
                last = k == length - 1 or bool(hits)
                finish = "stop" if hits or length < budget else "length"
                text = text[:min(hits)] if hits else text
                if last:  # as vLLM: a request is finished once its last output is out
                    rec["end"] = "finished"
                    self.finished += 1
                yield SampleDelta(0, [tok], text[sent:], [math.log(1 / 8)],
                                  finish if last else None,
                                  [self._top(sampling.top_logprobs)]
                                  if sampling.top_logprobs else None)
                sent = max(sent, len(text))
                if last:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            if rec["end"] is None:  # aborted before its last token: the engine frees it now
                rec["end"] = "cancelled"
                self.cancelled += 1
            raise
        finally:
            self.active -= 1


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


class FakeQHead:
    """A CD-Q value head with fixed values per token: V(x, yᵗ, z) = q[z] (0 if absent);
    the prefix value V(x, yᵗ) is the mean of q over the response's tokens."""

    def __init__(self, q: dict[int, float], name: str = "value:q") -> None:
        self.q, self.name = dict(q), name
        self.calls: list[tuple[list[int], list[int], list[int]]] = []

    def q_values(self, prompt_ids, response_ids, candidates) -> list[float]:
        self.calls.append((list(prompt_ids), list(response_ids), list(candidates)))
        return [self.q.get(z, 0.0) for z in candidates]

    def score_ids(self, prompt_ids, responses) -> list[float]:
        return [sum(self.q.get(t, 0.0) for t in r) / max(1, len(r)) for r in responses]

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        raise AssertionError("a value head is given token ids, never text")


class FakeFudgeHead:
    """A CD-FUDGE prefix value head: V(x, yᵗ) = count of token `tok` in yᵗ (ids, not text)."""

    def __init__(self, tok: int = 0, name: str = "value:fudge") -> None:
        self.tok, self.name = tok, name
        self.seen: list[list[int]] = []

    def score_ids(self, prompt_ids, responses) -> list[float]:
        self.seen += [list(r) for r in responses]
        return [float(list(r).count(self.tok)) for r in responses]

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        raise AssertionError("a value head is given token ids, never text")


class Exploding:
    name = "exploding"

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        raise RuntimeError("scorer failed")


def sse_events(body: str) -> list[dict]:
    """The JSON events of an SSE response body (comments, keep-alives and [DONE] left out)."""
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]


def streamed_text(events: list[dict]) -> str:
    """The first choice's content, as the deltas of `events` stream it."""
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


def make_app(engine: FakeEngine | None = None, tracer=None, **overrides):
    """The real app factory around the fakes, with tight limits to test them (`tracer`:
    server.observability.tracing.Tracing)."""
    from runtime.protocols import Runtime
    from runtime.scorers import ScorerRegistry
    from server.app import build_app
    from server.settings import Settings

    engine = engine or FakeEngine()
    scorers = ScorerRegistry({"good_count": WordReward, "bad_count": lambda: WordReward("bad", "bad_count"),
                              "fixed": lambda: FixedScores([3, 1, 2, 0] * 16),
                              "exploding": Exploding}, None)
    settings = Settings(**{"default_reward": "good_count", "max_n": 16, "max_choices": 4,
                           "max_tokens_limit": 64, "max_prompt_tokens": 40, **overrides})
    runtime = Runtime(engine=engine, scorers=scorers, ctx=DecodeContext(engine), model_name="fake")
    return build_app(settings, runtime, registry=CollectorRegistry(), tracer=tracer)


def finetune_cli(argv, capsys) -> tuple[int, str]:
    """`alignserve finetune *argv` in process: (exit status, stderr)."""
    from cli.main import main

    try:
        rc = main(["finetune", *argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err

