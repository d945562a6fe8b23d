"""The Nash (maximal-lottery) rule: pick among n candidates as a population of users would.

Users. The request's `reward` names the panel: each member of an ensemble
(`ensemble:A,B,-C`, runtime/ensemble.py; a `-` member counts −score, a cost as a utility) is one
user; a single scorer is one user. A request `cost` adds one more user with utility −cost,
weighted `cost_weight` in the population mean (every other user weighs 1). Each user is a
Bradley–Terry user on its calibrated utility uₖ(yᵢ) — the leave-one-out quantile of yᵢ among
the n candidates (decoding/calibration.py) — with temperature τ (`user_temperature`):
Pₖ(yᵢ ≻ yⱼ) = σ((uₖ(yᵢ) − uₖ(yⱼ))/τ). Calibration puts every user on the same unit-free
scale, so one τ serves the whole panel; τ = 0 is the deterministic limit (1, ½, 0).

Population preference: P[i, j] = Σₖ wₖ Pₖ(yᵢ ≻ yⱼ) / Σₖ wₖ. The maximal lottery (Fishburn
1984; "Nash learning from human feedback", Munos et al. 2024, the Nash equilibrium of the
preference game) is the mixed strategy q over the candidates with qᵀ(P − Pᵀ) ≥ 0: no candidate
is preferred to a draw from q by the population on average. It is the equilibrium of the
symmetric zero-sum game with payoff M = P − Pᵀ (value 0), one linear program
(`maximal_lottery`, scipy's HiGHS). When a Condorcet winner exists (P[w, j] > ½ for all
j ≠ w) the lottery is that winner alone; for cyclic preferences (rock–paper–scissors) it mixes.
"Distortion of AI Alignment" (in the design's sources) shows this rule's distortion is
minimax-optimal, where best-of-n on one reward model is not.

The answer is drawn from q with the request's seed. KL: the answer is one of n i.i.d. draws, so
π(y) ≤ n·p(y) and KL ≤ log n (`kl_bound`); no estimator is known for this rule (`kl_estimate`
null). `win_rate_bound` n/(n+1) holds for any rule over n draws. The answer reports the
lottery, the Condorcet winner (index or null), the index drawn, each user's raw utility of the
answer, and the win-rate estimate under the objective (reward − cost_weight·cost, the reward
being the ensemble's calibrated aggregate), decoding/calibration.py.

Judge instead of panel (option `judge`, a `decoding.pairwise.PairwiseScorer` by name, e.g.
`llm-judge`: the served model compares each pair of answers, both orders averaged): P comes
from the judge, not from users, and the same LP gives the lottery. The reward (one scorer; an
`ensemble:` panel with a judge is refused: two sources of preference) and cost still score the
candidates, for `reward`, `cost` and the win-rate estimate. A judge has no users, so `users`,
`user_utilities` and `panel_welfare` are absent (there is nothing per user to report); the
answer reports `judge`, the `preference_matrix`, `judge_engine_calls` and `judge_abstained`
instead. The answer is still one of the n i.i.d. candidates: KL ≤ log n and the n/(n+1)
win-rate bound hold, whatever the judge says.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from .calibration import loo_quantiles, win_rate
from .context import DecodeContext
from .kl import bon_win_rate_bound, selection_kl_bound
from .pairwise import JUDGES, MAX_JUDGE_N, PairwiseScorer, check_preferences
from .protocols import Scorer
from .request import DecodeRequest, DecodeResult, Scored, StrategyOptions, Timer
from .scorer_work import ScorerWork, objective_scorers
from .strategies import Traits, register
from .types import Sample


def preference_matrix(utilities: Sequence[Sequence[float]], temperature: float,
                      weights: Sequence[float] | None = None) -> np.ndarray:
    """P[i, j] = weighted mean over users k of σ((u_k,i − u_k,j)/τ); τ = 0: 1, ½ or 0.
    `utilities`: [users, candidates]. The diagonal is ½ and P + Pᵀ = 1."""
    u = np.asarray(utilities, dtype=float)  # [users, n]
    if u.ndim != 2 or u.shape[0] == 0:
        raise ValueError("preference_matrix needs [users, candidates] utilities, ≥ 1 user")
    w = np.ones(u.shape[0]) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (u.shape[0],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights: one non-negative weight per user, not all zero")
    diff = u[:, :, None] - u[:, None, :]  # [users, n, n]
    if temperature == 0:
        pk = 0.5 * (1 + np.sign(diff))
    else:
        pk = 0.5 * (1 + np.tanh(diff / (2 * temperature)))  # = σ(diff/τ), overflow-free
    return np.einsum("k,kij->ij", w / w.sum(), pk)


def maximal_lottery(p: np.ndarray) -> np.ndarray:
    """The maximal lottery of preference matrix P (P[i,j] = P(yᵢ ≻ yⱼ)): q ≥ 0, Σq = 1,
    qᵀM ≥ v·1 with v maximal for M = P − Pᵀ (the symmetric game's value is 0). One LP."""
    from scipy.optimize import linprog  # lazily: only this rule needs it

    p = np.asarray(p, dtype=float)
    n = p.shape[0]
    if p.shape != (n, n) or n == 0:
        raise ValueError("P must be a non-empty square matrix")
    if n == 1:
        return np.ones(1)
    m = p - p.T
    # variables [q_1..q_n, v]; maximise v  ⇔  minimise −v
    c = np.zeros(n + 1)
    c[-1] = -1.0
    a_ub = np.hstack([-m.T, np.ones((n, 1))])  # v − Σᵢ qᵢ M[i, j] ≤ 0 for every j
    a_eq = np.hstack([np.ones((1, n)), np.zeros((1, 1))])
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[1.0],
                  bounds=[(0.0, 1.0)] * n + [(None, None)], method="highs")
    if res.status != 0:  # cannot happen for a finite P (a zero-sum game has a value)
        raise RuntimeError(f"maximal lottery LP failed: {res.message}")
    q = np.clip(res.x[:n], 0.0, None)
    return q / q.sum()


def condorcet_winner(p: np.ndarray) -> int | None:
    """The candidate preferred to every other one (P[w, j] > ½ for all j ≠ w), if any."""
    n = p.shape[0]
    for i in range(n):
        if all(p[i, j] > 0.5 for j in range(n) if j != i):
            return i
    return None


@dataclass(frozen=True)
class _User:
    label: str
    scorer: Scorer
    sign: float
    weight: float


def panel_of(req: DecodeRequest) -> list[_User]:
    """The users: the reward's ensemble members (or the reward), plus −cost if any."""
    assert req.objective is not None
    obj = req.objective
    members = getattr(obj.reward, "members", None)
    if members:
        users = [_User(m.label, m.scorer, m.sign, 1.0) for m in members]
    else:
        users = [_User(obj.reward.name, obj.reward, 1.0, 1.0)]
    if obj.cost is not None:
        users.append(_User(f"-{obj.cost.name}", obj.cost, -1.0, obj.cost_weight))
    return users


@register
class Nash:
    class Options(StrategyOptions):
        user_temperature: float = Field(
            0.1, ge=0.0, le=10.0, description="τ of every Bradley–Terry user, on calibrated "
            "utilities (quantiles in [0, 1]); 0: deterministic preferences.")
        judge: str | None = Field(
            None, max_length=64, description="A pairwise judge instead of the panel: "
            f"{', '.join(JUDGES)} (the served model compares every pair of candidates, both "
            f"orders averaged: n(n − 1) one-token engine calls; n ≤ {MAX_JUDGE_N}).")

        @field_validator("judge")
        @classmethod
        def _a_pairwise_judge(cls, name: str | None) -> str | None:
            if name is not None and name not in JUDGES:
                raise ValueError(f"not a pairwise judge; available: {', '.join(JUDGES)}")
            return name

        # `alignment` is one flat object whose strategy options validate before the common
        # fields (server/protocol.py), so these validators of the common `reward` and `n`
        # see `judge` and refuse the combinations naming the field they are on.
        @field_validator("reward", check_fields=False)
        @classmethod
        def _judge_or_panel(cls, reward: str | None, info: ValidationInfo) -> str | None:
            if (info.data.get("judge") is not None and reward is not None
                    and reward.startswith("ensemble")):
                raise ValueError("an ensemble reward is a panel of users, and alignment.judge "
                                 "replaces the panel: give one of them (with a judge, the "
                                 "reward is one scorer, reported beside the judge's choice)")
            return reward

        @field_validator("n", check_fields=False)
        @classmethod
        def _judge_pairs(cls, n: int, info: ValidationInfo) -> int:
            if info.data.get("judge") is not None and n > MAX_JUDGE_N:
                raise ValueError(f"with alignment.judge, n ≤ {MAX_JUDGE_N}: the judge makes "
                                 "n(n − 1) engine calls")
            return n

    name = "nash"
    traits = Traits(needs_objective=True, streams="answer", needs_sampling=False,
                    relative_scores_ok=True)  # users are calibrated among one call's candidates

    async def run(self, req: DecodeRequest, ctx: DecodeContext) -> DecodeResult:
        assert req.objective is not None
        opts = self.Options.of(req)
        timer = Timer()
        samples = await ctx.generate(req.prompt_ids, req.n, req.sampling, timer)
        if opts.judge is not None:
            return await _judged(req, ctx, JUDGES[opts.judge](ctx.engine), samples, timer)
        users = panel_of(req)
        raw = await _score_users(ctx, req, users, samples, timer)
        calibrated = [loo_quantiles(row) for row in raw]
        p = preference_matrix(calibrated, opts.user_temperature, [u.weight for u in users])
        pool = _objective_scores(req, users, raw, samples)
        result, q = await _draw(req, ctx, samples, p, pool, timer)
        chosen = result.extra["chosen_index"]
        result.extra.update({
            "users": [u.label for u in users],
            "user_utilities": {u.label: row[chosen] for u, row in zip(users, raw)},
            "user_temperature": opts.user_temperature,
            # average min–max normalised utility over the users (`welfare`): the answer's, the
            # lottery's expectation and the best candidate's — best/answer is its distortion
            "panel_welfare": _welfare_fields(raw, q, chosen),
        })
        work = ScorerWork()
        work.add(samples, len(users))  # every user read every candidate
        result.extra.update(work.fields())
        return result


async def _draw(req: DecodeRequest, ctx: DecodeContext, samples: Sequence[Sample],
                p: np.ndarray, pool: list[Scored], timer: Timer
                ) -> tuple[DecodeResult, np.ndarray]:
    """The maximal lottery q of P, the answer drawn from it with the request's seed, and the
    fields every nash answer reports; returns (the result, q)."""
    # in a worker thread: scipy's first import takes ~0.8 s, which must not stall the loop
    q = await asyncio.get_running_loop().run_in_executor(ctx.executor, maximal_lottery, p)
    chosen = random.Random(req.seed).choices(range(req.n), weights=q.tolist())[0]
    result = DecodeResult(
        strategy=Nash.name, n=req.n, sample=samples[chosen], reward=pool[chosen].reward,
        cost=pool[chosen].cost, kl_bound=selection_kl_bound(req.n), kl_estimate=None,
        win_rate_bound=bon_win_rate_bound(req.n),
        generated_tokens=sum(len(s.token_ids) for s in samples), scored_candidates=req.n,
        timer=timer, candidates=pool if req.return_candidates else None)
    result.extra = {
        "lottery": [round(float(x), 6) for x in q], "chosen_index": chosen,
        "condorcet_winner": condorcet_winner(p),
        **win_rate([s.score for s in pool], chosen).fields(),
    }
    return result, q


async def _judged(req: DecodeRequest, ctx: DecodeContext, judge: PairwiseScorer,
                  samples: Sequence[Sample], timer: Timer) -> DecodeResult:
    """Nash over a pairwise judge's P (module docstring); the objective scores the candidates
    concurrently, for the reported reward, cost and win-rate estimate."""
    assert req.objective is not None
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        pool, raw_p = await asyncio.gather(
            ctx.score_samples(req.objective, req, samples, Timer()),
            judge.prefer(req.prompt_text, [s.text for s in samples]))
    except Exception as exc:
        exc.add_note(f"raised by nash judge {judge.name} or the objective")
        raise
    finally:
        timer.score_s += loop.time() - t0
    p = check_preferences(raw_p, req.n, judge.name)
    result, _ = await _draw(req, ctx, samples, p, pool, timer)
    result.extra.update({"judge": judge.name,
                         "preference_matrix": [[round(float(x), 6) for x in row] for row in p],
                         "judge_engine_calls": getattr(judge, "calls", 0),
                         # orders where the judge gave neither letter (counted ½, pairwise.py)
                         "judge_abstained": getattr(judge, "abstained", 0)})
    work = ScorerWork()
    work.add(samples, objective_scorers(req.objective))
    work.add(samples, 2 * (req.n - 1))  # each candidate is in 2(n − 1) of the judge's prompts
    result.extra.update(work.fields())
    return result


async def _score_users(ctx: DecodeContext, req: DecodeRequest, users: list[_User],
                       samples: Sequence[Sample], timer: Timer) -> list[list[float]]:
    """Each user's signed raw utility of every candidate, users scored concurrently (through
    the context, so token scorers read ids, and tracing and batching apply)."""
    async def one(u: _User) -> list[float]:
        try:
            return await ctx.score(u.scorer, req, samples)
        except Exception as exc:  # fails the request, with the user named; never dropped
            exc.add_note(f"raised by nash user {u.label}")
            raise

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        rows = await asyncio.gather(*(one(u) for u in users))
    finally:
        timer.score_s += loop.time() - t0
    for u, row in zip(users, rows):
        if any(math.isnan(v) for v in row):
            raise RuntimeError(f"nash user {u.label} returned NaN")
    return [[u.sign * v for v in row] for u, row in zip(users, rows)]


def _welfare_fields(raw: list[list[float]], q: np.ndarray, chosen: int) -> dict[str, float]:
    w = welfare(raw)
    return {"answer": float(w[chosen]), "expected": float(q @ w), "best": float(w.max())}


def _objective_scores(req: DecodeRequest, users: list[_User], raw: list[list[float]],
                      samples: Sequence[Sample]) -> list[Scored]:
    """Reward (the ensemble's aggregate of its members' calibrated utilities, or the single
    reward's raw score), cost and objective of every candidate, from the users' scores."""
    assert req.objective is not None
    obj = req.objective
    has_cost = obj.cost is not None
    reward_rows = raw[:-1] if has_cost else raw
    combine = getattr(obj.reward, "combine", None)
    rewards = combine(reward_rows) if combine is not None else reward_rows[0]
    costs: list[float | None] = [-c for c in raw[-1]] if has_cost else [None] * len(samples)
    return [Scored(s, r, c, r - obj.cost_weight * c if c is not None else r)
            for s, r, c in zip(samples, rewards, costs)]


# ---- distortion (for `alignserve eval --panel`; pure, per prompt then over prompts) ----------


def welfare(utilities: Sequence[Sequence[float]]) -> np.ndarray:
    """Average normalised utility of each candidate over the users, [users, n] → [n]. Each
    user's utilities are min–max normalised over the candidates (its best 1, its worst 0; a
    user indifferent among them all: 1 everywhere), so no user's scale dominates."""
    u = np.asarray(utilities, dtype=float)
    lo, hi = u.min(axis=1, keepdims=True), u.max(axis=1, keepdims=True)
    span = hi - lo
    norm = np.where(span > 0, (u - lo) / np.where(span > 0, span, 1.0), 1.0)
    return norm.mean(axis=0)


def distortion_terms(utilities: Sequence[Sequence[float]], lottery: Sequence[float]
                     ) -> tuple[float, float]:
    """(best achievable average utility among the candidates, expected average utility of
    the rule's answer) for one prompt; `lottery`: the rule's distribution over the
    candidates (one-hot for a deterministic rule). "Distortion of AI Alignment" defines the
    distortion as their ratio (a reconstruction of its definition on a finite candidate set)."""
    w = welfare(utilities)
    q = np.asarray(lottery, dtype=float)
    if q.shape != w.shape or (q < 0).any() or not math.isclose(q.sum(), 1.0, abs_tol=1e-6):
        raise ValueError("lottery: one probability per candidate, summing to 1")
    return float(w.max()), float(q @ w)


def distortion(terms: Sequence[tuple[float, float]], level: float = 0.95,
               resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Distortion over prompts: Σ best / Σ achieved (a ratio of means, stable where one
    prompt's answer has welfare near 0), with a percentile bootstrap interval over prompts."""
    t = np.asarray(terms, dtype=float)  # [prompts, 2]
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] != 2:
        raise ValueError("terms: one (best, achieved) pair per prompt, at least one")

    def ratio(rows: np.ndarray) -> np.ndarray:  # [..., prompts, 2] -> [...]
        achieved = rows[..., 1].sum(axis=-1)
        return np.where(achieved > 0, rows[..., 0].sum(axis=-1) / np.where(
            achieved > 0, achieved, 1.0), np.inf)

    rng = np.random.default_rng(seed)
    boot = ratio(t[rng.integers(0, len(t), size=(resamples, len(t)))])
    tail = (1 - level) / 2
    lo, hi = np.quantile(boot, [tail, 1 - tail], method="inverted_cdf")  # inf-safe: no interpolation
    return float(ratio(t)), float(lo), float(hi)
