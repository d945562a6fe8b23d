"""RDRO: relative density ratio optimisation (Takahashi, Iwata, Kumagai, Kanai, Yamada, Nishida &
Shinoda, "Relative Density Ratio Optimization for Stable and Statistically Consistent Model
Alignment", arXiv 2604.04410), beside KLDO and PRO in the explicit loop (finetune/loop.py).

RECONSTRUCTED. Only the paper's abstract and third-party summaries could be read here, not its
method section, so the equation below is this project's reconstruction and carries no equation
number from the paper. What the readable sources fix: the language model parametrises the
*relative* density ratio between the preferred distribution p⁺ and the α-mixture of preferred and
non-preferred ones, r_α = p⁺ / (α·p⁺ + (1 − α)·p⁻) ≤ 1/α (Yamada, Suzuki, Kanamori, Hachiya &
Sugiyama 2013, "Relative density-ratio estimation for robust distribution comparison", Neural
Computation 25(5), §2), where DDRO (Higuchi & Suzuki, arXiv 2505.07558) parametrises the plain,
unbounded ratio p⁺/p⁻; it is fitted by density-ratio estimation with a logistic-regression loss.
The reconstruction:

    r_θ(x, y) = (π_θ(y|x) / π_ref(y|x))^β                          (β = 1: the paper's r_θ)
    L(θ) = E_{p⁺}[−log σ(u)] + E_{q_α}[−log σ(−u)],   u = log r_θ,  q_α = α·p⁺ + (1 − α)·p⁻
         = E_{p⁺}[−log σ(u) − α·log σ(−u)] + (1 − α)·E_{p⁻}[−log σ(−u)]            (RDRO)

i.e. logistic regression of "drawn from p⁺" against "drawn from the α-mixture", whose logit is the
log of the ratio: the pointwise minimiser is σ(u) = p⁺/(p⁺ + q_α), e^u = r_α. Boundedness is
structural: on an answer seen only among the preferred ones the loss −log σ(u) − α·log σ(−u) is
minimised at e^u = 1/α and its gradient turns round there (it pulls r_θ back down past 1/α);
at α = 0 the same loss is DDRO's logistic ratio fit, −E_{p⁺}[log σ(u)] − E_{p⁻}[log σ(−u)], whose
preferred-only terms push u → ∞ for ever (the divergence RDRO removes). The bound is the
optimum's, not every iterate's: a step on shared weights can carry one answer's r_θ past 1/α
for a while (3 LoRA steps on SmolLM2 reached 12 with α = 0.5), and the loss then pulls it back.
The mixture expectation needs no mixture samples: E_{q_α}[f] = α·E_{p⁺}[f] + (1 − α)·E_{p⁻}[f],
which gives the second line.

Choices where the paper could not be read:
- the loss is the logistic (binary cross-entropy) density-ratio loss, not RuLSIF's squared loss;
- α defaults to 0.5. If the answers were drawn from π_ref and split by a preference judgement,
  π_ref = μ·p⁺ + (1 − μ)·p⁻ with μ the preferred share, and α = μ makes π_ref·r_α = p⁺ exactly
  (statistical consistency); `--alpha` sets it, e.g. to the report's preferred share;
- β (default 1) is a temperature on the ratio, as DPO's; β = 1 is the paper's parametrisation;
- data: KLDO's aligned / unaligned sets (finetune/feedback.py `kldo_sets`: p⁺ = D⁺, p⁻ = D⁻),
  ⌈batch/2⌉ of each per step, unpaired.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from .feedback import Completion
from .loop import Objective
from .utils import pick_balanced

DEFAULT_ALPHA = 0.5
DEFAULT_BETA = 1.0


def relative_ratio(p_plus: torch.Tensor, p_minus: torch.Tensor, alpha: float) -> torch.Tensor:
    """r_α = p⁺ / (α·p⁺ + (1 − α)·p⁻) elementwise (0 where both are 0); ≤ 1/α for α > 0."""
    mix = alpha * p_plus + (1 - alpha) * p_minus
    return torch.where(mix > 0, p_plus / mix.clamp_min(torch.finfo(mix.dtype).tiny),
                       torch.zeros_like(mix))


def rdro_terms(log_ratio_preferred: torch.Tensor, log_ratio_nonpreferred: torch.Tensor,
               alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-answer RDRO losses (module docstring) from u = log r_θ: preferred [n⁺] →
    −log σ(u) − α·log σ(−u); non-preferred [n⁻] → (1 − α)·(−log σ(−u))."""
    pos = -F.logsigmoid(log_ratio_preferred) - alpha * F.logsigmoid(-log_ratio_preferred)
    neg = -(1 - alpha) * F.logsigmoid(-log_ratio_nonpreferred)
    return pos, neg


def rdro_loss(policy_preferred: torch.Tensor, ref_preferred: torch.Tensor,
              policy_nonpreferred: torch.Tensor, ref_nonpreferred: torch.Tensor, alpha: float,
              beta: float = DEFAULT_BETA) -> torch.Tensor:
    """RDRO's loss (scalar) on summed answer log-probs, u = β·(log π_θ − log π_ref):
    mean over p⁺ of −log σ(u) − α·log σ(−u) plus (1 − α)·mean over p⁻ of −log σ(−u).
    2·log 2 at the reference (u = 0) for every α. α = 0 is DDRO (`ddro_loss`)."""
    if not 0 <= alpha < 1:
        raise ValueError(f"RDRO's alpha must lie in [0, 1), got {alpha}")
    pos, neg = rdro_terms(beta * (policy_preferred - ref_preferred),
                          beta * (policy_nonpreferred - ref_nonpreferred), alpha)
    return pos.mean() + neg.mean()


def ddro_loss(policy_preferred: torch.Tensor, ref_preferred: torch.Tensor,
              policy_nonpreferred: torch.Tensor, ref_nonpreferred: torch.Tensor,
              beta: float = DEFAULT_BETA) -> torch.Tensor:
    """The unbounded ratio's logistic fit (RDRO at α = 0): −E_{p⁺}[log σ(u)] − E_{p⁻}[log σ(−u)].
    Only for comparison (tests, docs): its preferred-only answers have no finite optimum."""
    return rdro_loss(policy_preferred, ref_preferred, policy_nonpreferred, ref_nonpreferred,
                     0.0, beta)


def rdro_stats(u: torch.Tensor, score: torch.Tensor, alpha: float) -> dict:
    """Report statistics from u = log r_θ of every answer and its label (+1 p⁺, −1 p⁻):
    `loss`; `chosen_reward` / `rejected_reward` mean u on p⁺ / p⁻ (u is the implicit reward of
    β·log π_θ/π_ref, as in the other methods); `reward_margin`; `accuracy` share of answers on
    the right side of 0 (0 at the reference); `ratio_max` the largest r_θ on any answer, with
    `ratio_bound` = 1/α beside it (the optimum's bound; the loss pulls iterates back below it)."""
    pos, neg = u[score > 0], u[score < 0]
    loss = float(sum(t.mean() for t in rdro_terms(pos, neg, alpha)))
    chosen, rejected = float(pos.mean()), float(neg.mean())
    signed = torch.sign(u) == torch.sign(score)
    return {"pairs": int(u.numel()), "loss": loss, "chosen_reward": chosen,
            "rejected_reward": rejected, "reward_margin": chosen - rejected,
            "accuracy": float(signed.float().mean()), "ratio_max": float(torch.exp(u.max())),
            "ratio_bound": 1 / alpha if alpha > 0 else float("inf")}


def rdro_objective(completions: list[Completion], beta: float, alpha: float) -> Objective:
    """RDRO on preferred (score > 0) and non-preferred (score < 0) completions for
    finetune/loop.py: a step takes ⌈batch/2⌉ of each."""
    if not 0 < alpha < 1:
        raise ValueError(f"RDRO needs 0 < alpha < 1, got {alpha}")
    score = torch.tensor([c.score for c in completions])
    pos = [i for i, c in enumerate(completions) if c.score > 0]
    neg = [i for i, c in enumerate(completions) if c.score < 0]
    if not pos or not neg:
        raise ValueError(f"RDRO needs preferred and non-preferred completions, got {len(pos)} "
                         f"preferred and {len(neg)} non-preferred")
    state: dict = {"labels": None}

    def sample(rng: random.Random, batch: int) -> list[int]:
        idx = pick_balanced(rng, pos, neg, batch)
        state["labels"] = score[idx]
        return idx

    def loss(lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        lab = state["labels"]
        return rdro_loss(lp[lab > 0], ref[lab > 0], lp[lab < 0], ref[lab < 0], alpha, beta)

    def stats(lp: torch.Tensor, ref: torch.Tensor) -> dict:
        return rdro_stats(beta * (lp - ref), score, alpha)

    return Objective("rdro", [(c.prompt, c.text) for c in completions], sample, loss, stats)
