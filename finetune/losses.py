"""Preference losses and pair statistics on sequence log-probabilities (torch).

SafeDPO (arXiv 2505.20065), for a pair after the transform T (finetune/safedpo.py):

    L = −log σ( β·log π_θ(ỹ_w|x)/π_ref(ỹ_w|x) − β·log π_θ(ỹ_l|x)/π_ref(ỹ_l|x) − (h̃_l − h̃_w)·Δ )

Sign of the Δ term. After T, h̃_w = 0, so the offset is −Δ exactly when the rejected answer is
unsafe and 0 otherwise. Subtracting Δ inside σ means the loss only becomes small once the implicit
reward margin β·(log-ratio_w − log-ratio_l) exceeds Δ: pairs whose loser is unsafe demand a larger
margin (the gradient stays near its maximum until then), which pushes unsafe answers down harder.
This is the paper's "safety margin": with Δ ≥ 0 it enhances safety without moving the optimum,
because the optimal policy gives unsafe answers probability 0 (r_c = −∞, log-ratio → −∞), where
any finite offset is dominated. A "+Δ" would do the opposite (ease off on unsafe losers). Δ = 0
is plain DPO (Rafailov et al. 2023, arXiv 2305.18290) on the transformed pairs; MoCAN uses it.

All functions take per-pair tensors of shape [pairs] (summed log-probs of each completion).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def preference_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
                      offset: torch.Tensor | float = 0.0) -> torch.Tensor:
    """z = β·(log-ratio_w − log-ratio_l) − offset, with offset = (h̃_l − h̃_w)·Δ. Shape [pairs]."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return margin - offset


def safedpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                 ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, h_chosen: torch.Tensor,
                 h_rejected: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """Per-pair SafeDPO loss −log σ(z) (module docstring), shape [pairs]."""
    offset = (h_rejected.to(policy_chosen.dtype) - h_chosen.to(policy_chosen.dtype)) * delta
    return -F.logsigmoid(preference_logits(policy_chosen, policy_rejected, ref_chosen,
                                           ref_rejected, beta, offset))


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss (SafeDPO with Δ = 0), shape [pairs]."""
    return -F.logsigmoid(preference_logits(policy_chosen, policy_rejected, ref_chosen,
                                           ref_rejected, beta))


def pair_stats(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, offset: torch.Tensor,
               beta: float) -> dict[str, float]:
    """Mean loss, implicit reward margin β·(log-ratio_w − log-ratio_l) (without the offset),
    accuracy (share of pairs with margin > 0) and, where any pair has an unsafe loser, the
    accuracy on those pairs (does the policy now prefer the safe answer?)."""
    z = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, offset)
    margin = z + offset
    stats = {"pairs": int(z.numel()), "loss": float(-F.logsigmoid(z).mean()),
             "reward_margin": float(margin.mean()),
             "accuracy": float((margin > 0).float().mean()),
             "chosen_reward": float((beta * (policy_chosen - ref_chosen)).mean()),
             "rejected_reward": float((beta * (policy_rejected - ref_rejected)).mean())}
    unsafe = offset > 0
    if bool(unsafe.any()):
        stats["accuracy_unsafe_rejected"] = float((margin[unsafe] > 0).float().mean())
    return stats


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor,
                   completion_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t log p(token_t | tokens_<t) over completion tokens. logits [B, T, V], ids/mask [B, T]
    → [B]. Position t's logits predict token t+1, hence the shift."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return (token_logp * completion_mask[:, 1:]).sum(dim=1)


# --- KLDO (Haldar et al., "LLM Safety Alignment is Divergence Estimation in Disguise", -----
# --- arXiv 2502.00657) -------------------------------------------------------------------

def log_mean_exp(t: torch.Tensor, running_mean: float | None = None) -> torch.Tensor:
    """log (1/n)·Σ exp(t_i) over a 1-D tensor, computed with logsumexp.

    With `running_mean` (an exponential moving average of mean exp(t) over past batches) the
    value is the same but the gradient divides by the running mean instead of this batch's
    mean: Σ exp(t_i)·∇t_i / (n·EMA). That is MINE's bias correction for the gradient of a
    log-of-an-expectation (Belghazi et al. 2018, arXiv 1801.04062), which KLDO's reference
    trainer uses by default (`type: ma`, rate 0.1)."""
    lme = torch.logsumexp(t, 0) - math.log(t.numel())
    if running_mean is None:
        return lme
    m = torch.exp(lme)  # mean exp(t), with gradient Σ exp(t_i)·∇t_i / n
    return lme.detach() + (m - m.detach()) / running_mean


def kldo_loss(policy_aligned: torch.Tensor, ref_aligned: torch.Tensor,
              policy_unaligned: torch.Tensor, ref_unaligned: torch.Tensor, beta: float,
              running_mean: float | None = None, normalize: bool = False) -> torch.Tensor:
    """KLDO's loss (scalar): the negative Donsker–Varadhan lower bound of KL(D⁺‖D⁻),

        L = −E_{D⁺}[r_θ(x, y)] + log E_{D⁻}[exp r_θ(x, y)],   r_θ = β·log π_θ(y|x)/π_ref(y|x)

    with D⁺ the aligned completions (safe / compliant where compliance is right, refusal where
    it is not) and D⁻ the unaligned ones, unpaired. −L is an estimate of KL(D⁺‖D⁻) with the
    implicit reward as the critic, so minimising L drives the two apart (the paper's
    "alignment as divergence estimation"). Inputs: per-completion summed log-probs, [n⁺]
    and [n⁻]; `running_mean` see `log_mean_exp`.

    `normalize` is the reference trainer's default (rhaldarpurdue/KLDO, train/trainers.py
    `KLTrainer.get_batch_metrics`, config/loss/kl.yaml `normalize: true`, "helps with
    stability"): with a = E_{D⁺}[r] and u the log-mean-exp term, u is multiplied by the constant
    (no gradient) min(a, u)/(u + 1e-9), so its value never exceeds a and its gradient is
    rescaled by the same factor (at u = 0, e.g. the first step where π_θ = π_ref, the factor is
    0). The loss is then no longer −(the Donsker–Varadhan bound); report the bound unnormalised."""
    aligned = beta * (policy_aligned - ref_aligned)
    unaligned = beta * (policy_unaligned - ref_unaligned)
    a, u = aligned.mean(), log_mean_exp(unaligned, running_mean)
    if normalize:
        u_value = float(u.detach())
        u = u * (min(float(a.detach()), u_value) / (u_value + 1e-9))
    return -a + u


# --- PRO (Guo, Li & Chen, "Proximalized Preference Optimization for Diverse Feedback Types: --
# --- A Decomposed Perspective on DPO", arXiv 2505.23316) ----------------------------------
#
# Read from the paper (Theorem 3.1, via its abstract and a review of it): the DPO loss equals
#
#     L = −β·E_{y∼μ}[s(y)·log π_θ(y)]  +  ½·E_{y₁,y₂∼μ}[KL(B(½) ‖ B(σ(r_θ(y₁) − r_θ(y₂))))]
#           optimiser                     regulariser
#
# with s(y) = E_{y'∼μ}[p(y ≻ y')] − ½ and B a Bernoulli law; per pair it is an identity:
# −log σ(d) = −d/2 + KL(B(½)‖B(σ(d))) + log 2, d = r_w − r_l. Standard DPO evaluates the
# regulariser only on the sampled pair, which fixes differences of log-likelihoods and leaves
# their level free ("likelihood underdetermination"); PRO restores the full regulariser with a
# "hyper-response" approximation. The exact form of that approximation and of its weight could
# NOT be read (only the paper's first pages were available): `hyper_response_reward` and the
# weight α below are this project's reconstruction — one hyper-response ȳ per example standing
# for all responses outside the data, π(ȳ) = 1 − Σ_data π(y), so that each example is also
# compared with ȳ. For long answers π(y) ≈ 0, r(ȳ) ≈ 0, and the term KL(B(½)‖B(σ(r − r̄)))
# anchors each implicit reward near 0: the "proximal" pull that DPO's pair term lacks.

def bernoulli_half_kl(d: torch.Tensor) -> torch.Tensor:
    """KL(B(½) ‖ B(σ(d))) = −log 2 − ½·(log σ(d) + log σ(−d)), elementwise; ≥ 0, 0 at d = 0,
    symmetric in d, ≈ d²/8 near 0 and |d|/2 far out."""
    return -math.log(2.0) - 0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurately at both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def hyper_response_reward(policy_logps: torch.Tensor, ref_logps: torch.Tensor,
                          beta: float) -> torch.Tensor:
    """r(ȳ) = β·[log(1 − Σ_j π_θ(y_j)) − log(1 − Σ_j π_ref(y_j))] for the hyper-response ȳ
    that collects every response except the row's own examples y_j. Inputs [rows, k]
    (k = 2 for a pair, 1 for unpaired feedback) → [rows]. Our reconstruction (see above)."""
    outside = _log1mexp(torch.logsumexp(policy_logps, dim=-1))
    outside_ref = _log1mexp(torch.logsumexp(ref_logps, dim=-1))
    return beta * (outside - outside_ref)


def pro_pairwise_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
                      alpha: float) -> torch.Tensor:
    """Per-pair PRO loss for pairwise feedback, shape [pairs]:

        −½·(r_w − r_l)  +  α·[KL_B(r_w − r_l) + KL_B(r_w − r̄) + KL_B(r_l − r̄)]

    (s = +½ for the chosen, −½ for the rejected answer; KL_B = `bernoulli_half_kl`; r̄ =
    `hyper_response_reward` of the pair). Without the two r̄ terms and α = 1 this is DPO's
    loss minus log 2, exactly."""
    r_w = beta * (policy_chosen - ref_chosen)
    r_l = beta * (policy_rejected - ref_rejected)
    r_bar = hyper_response_reward(torch.stack([policy_chosen, policy_rejected], -1),
                                  torch.stack([ref_chosen, ref_rejected], -1), beta)
    reg = bernoulli_half_kl(r_w - r_l) + bernoulli_half_kl(r_w - r_bar) + bernoulli_half_kl(
        r_l - r_bar)
    return -0.5 * (r_w - r_l) + alpha * reg


def pro_unpaired_loss(policy: torch.Tensor, ref: torch.Tensor, score: torch.Tensor,
                      beta: float, alpha: float) -> torch.Tensor:
    """Per-completion PRO loss for binary (s = ±½) or scalar (s ∈ [−½, ½]) feedback, [n]:

        −s·r  +  α·KL_B(r − r̄)

    The optimiser term is the paper's −β·s·log π_θ (shifted by the constant β·s·log π_ref, so
    it reads 0 at the reference); the regulariser is the hyper-response comparison alone
    (an unpaired example has no partner). Its minimiser solves σ(r − r̄) = ½ + s/α, finite only
    when α > 2·|s| — hence `alpha` > 1 for binary feedback."""
    r = beta * (policy - ref)
    r_bar = hyper_response_reward(policy.unsqueeze(-1), ref.unsqueeze(-1), beta)
    return -score.to(r.dtype) * r + alpha * bernoulli_half_kl(r - r_bar)
