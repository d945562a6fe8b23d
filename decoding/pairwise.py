"""Pairwise preference scorers, P(y ≻ y' | x), and a judge that asks the served model.

`PairwiseScorer` is the protocol the Nash rule (decoding/nash.py, option `judge`) reads its
preference matrix from when no panel of scorers gives it: `prefer(prompt, candidates)` returns
the n×n matrix P[i][j] = P(yᵢ ≻ yⱼ | x) with P[i][j] + P[j][i] = 1 and P[i][i] = ½
(`check_preferences`).

`LLMJudge` (name `llm-judge`) is the served policy itself used as a judge, through the `Engine`
protocol only (it needs the engine's tokenizer, as the aligner does): for every ordered pair
(i, j), i ≠ j, one engine call renders a fixed comparison prompt with the tokenizer's chat
template — the question, "Answer A" = yᵢ, "Answer B" = yⱼ, "Which answer is better? Reply A or
B." — and asks for ONE token with its top log-probs. P_A(i, j), the probability the judge
answers "A", is read from that first token's log-probs renormalised over the two letters
(every single-token spelling of each letter, e.g. "A" and " A", summed). A logit bias, equal for
all those tokens, puts them at the top of the distribution so the top log-probs always hold
them; an equal shift of their logits leaves their ratio, and so the renormalised P_A,
unchanged. LLM judges favour one position (Zheng et al. 2023, "Judging LLM-as-a-Judge",
§3.3: position bias); asking both orders and averaging cancels a constant bias:

    P(i ≻ j) = ½ [P_A(i, j) + P_B(j, i)],   P_B(j, i) = 1 − P_A(j, i)

which is antisymmetric by construction (P(i ≻ j) + P(j ≻ i) = 1). Cost: n(n − 1) one-token
engine calls, each prefilling the question and two answers (concurrent; the prefix cache shares
the template's and the question's KV blocks). Where neither letter is among the returned log-probs
(an engine that ignores the bias), that order counts ½ (no information) and `abstained` counts it.

A small policy (the default SmolLM2-135M) is a weak judge: its preferences are close to ½ and
follow surface features; the rule and its accounting hold for any judge, a better one only
makes the matrix more informative. The answer is still one of the n i.i.d. candidates, so the
Nash rule's KL ≤ log n holds whatever the judge says.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import EngineRejected
from .protocols import Engine
from .types import Sampling

TEMPLATE = ("Question:\n{question}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
            "Which answer is better? Reply A or B.")
LETTER_BIAS = 50.0  # equal for both letters: moves them to the top, keeps their ratio
MAX_JUDGE_N = 16  # n(n − 1) engine calls per answer: 240 at 16


@runtime_checkable
class PairwiseScorer(Protocol):
    """P(yᵢ ≻ yⱼ | prompt) for every pair of candidates, as an n×n matrix (module docstring)."""

    name: str

    async def prefer(self, prompt: str, candidates: Sequence[str]) -> list[list[float]]: ...


def check_preferences(p: Sequence[Sequence[float]], n: int, who: str) -> np.ndarray:
    """P as an array, after checking what every pairwise scorer promises: n×n, entries in
    [0, 1], P + Pᵀ = 1, diagonal ½. A judge that breaks it fails the request, named."""
    m = np.asarray(p, dtype=float)
    if m.shape != (n, n) or not np.isfinite(m).all() or (m < 0).any() or (m > 1).any():
        raise RuntimeError(f"pairwise judge {who} returned no {n}×{n} matrix of probabilities")
    if not np.allclose(m + m.T, 1.0, atol=1e-6):
        raise RuntimeError(f"pairwise judge {who}: P[i][j] + P[j][i] ≠ 1")
    return m


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = ...,
                            add_generation_prompt: bool = ..., **kw: Any) -> Any: ...


class LLMJudge:
    """The served model as a pairwise judge (module docstring). One object per request: it
    counts that request's engine calls (`calls`) and prompt tokens (`prompt_tokens`)."""

    name = "llm-judge"

    def __init__(self, engine: Engine) -> None:
        tokenizer: _Tokenizer | None = getattr(engine, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError("the llm-judge needs an engine with a tokenizer")
        self._engine, self._tok = engine, tokenizer
        self._letters = (_letter_ids(tokenizer, "A"), _letter_ids(tokenizer, "B"))
        self._limit: int | None = getattr(engine, "max_model_len", None)
        self.calls = 0
        self.prompt_tokens = 0
        self.abstained = 0  # orders where neither letter came back (counted ½)

    async def prefer(self, prompt: str, candidates: Sequence[str]) -> list[list[float]]:
        n = len(candidates)
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        first = dict(zip(pairs, await asyncio.gather(
            *(self.p_first(prompt, candidates[i], candidates[j]) for i, j in pairs))))
        p = [[0.5] * n for _ in range(n)]
        for i, j in pairs:
            if i < j:  # both orders: i as A, and i as B (j as A)
                p[i][j] = 0.5 * (first[i, j] + (1.0 - first[j, i]))
                p[j][i] = 1.0 - p[i][j]
        return p

    async def p_first(self, question: str, a: str, b: str) -> float:
        """P_A: the judge's probability of "A" over {A, B} for answers a (A) and b (B)."""
        text = self._tok.apply_chat_template(
            [{"role": "user", "content": TEMPLATE.format(question=question, a=a, b=b)}],
            tokenize=False, add_generation_prompt=True)
        ids = list(self._tok.encode(text, add_special_tokens=False))
        if self._limit is not None and len(ids) + 1 > self._limit:
            raise EngineRejected(f"the llm-judge's comparison of two answers takes {len(ids)} "
                                 f"prompt tokens, over the model's context {self._limit}: lower "
                                 "max_tokens", param="max_tokens")
        letter_ids = self._letters[0] + self._letters[1]
        sampling = Sampling(max_tokens=1, temperature=1.0, top_logprobs=len(letter_ids),
                            logit_bias=tuple((t, LETTER_BIAS) for t in letter_ids))
        self.calls += 1
        self.prompt_tokens += len(ids)
        [sample] = await self._engine.generate(ids, 1, sampling)
        top = sample.top_logprobs[0] if sample.top_logprobs else {}
        la, lb = (_logsumexp([top[t] for t in group if t in top]) for group in self._letters)
        if la == -math.inf and lb == -math.inf:
            self.abstained += 1
            return 0.5
        return 1.0 / (1.0 + math.exp(lb - la)) if lb - la < 700 else 0.0


def _letter_ids(tokenizer: _Tokenizer, letter: str) -> tuple[int, ...]:
    """Every single-token spelling of `letter` (bare, and after a space)."""
    ids = {tuple(tokenizer.encode(v, add_special_tokens=False)) for v in (letter, " " + letter)}
    single = tuple(sorted({t[0] for t in ids if len(t) == 1}))
    if not single:
        raise RuntimeError(f"the llm-judge needs {letter!r} to be one token of the tokenizer")
    return single


def _logsumexp(values: Sequence[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


# The pairwise judges a request may name (`alignment.judge`), each built per request from the
# strategies' engine. Built-in and loading nothing (the served model judges), so there is
# nothing for a sealed registry to guard; their cost is bounded by MAX_JUDGE_N.
JUDGES: dict[str, Callable[[Engine], PairwiseScorer]] = {LLMJudge.name: LLMJudge}
