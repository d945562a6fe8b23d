"""BOND's Jeffreys-divergence objective as pure torch functions (arXiv 2407.14622).

BOND minimises, per prompt, the Jeffreys divergence between the policy π_θ and π_BoN:

    J_β(π_θ) = (1 − β)·KL(π_BoN ‖ π_θ) + β·KL(π_θ ‖ π_BoN),     β ∈ [0, 1] (paper: β = 0.5)

- forward term KL(π_BoN ‖ π_θ) = −E_{y~π_BoN}[log π_θ(y)] + const: maximum likelihood on
  best-of-n samples (mode covering). Here the expectation is exact over the K reference samples
  of a prompt, with the empirical BoN weights w_k (finetune/bond.py `bon_weights`):
      L_fwd = −Σ_k w_k·log π_θ(y_k)
- backward term KL(π_θ ‖ π_BoN) (mode seeking) with log π_BoN(y) ≈ log n + log π_ref(y)
  + (n − 1)·log p≤(y): the n·π_ref·p≤ⁿ⁻¹ form, an *approximation* for answers whose own
  probability π_ref(y) is small (the exact law is p≤ⁿ − p<ⁿ = π_ref·p≤ⁿ⁻¹·Σᵢ(p</p≤)ⁱ⁻¹, which
  it matches only as π_ref(y) → 0; for long sampled answers that is the regime):
      KL(π_θ ‖ π_BoN) = E_{y~π_θ}[log π_θ(y) − log π_ref(y) − (n − 1)·log p≤(y)] − log n
  i.e. a KL-regularised RL problem with reward log p≤(y) and KL weight 1/(n − 1) once divided by
  n − 1, which is exactly vBoN's objective (Amini et al., arXiv 2407.06057: max E[log F(r)] −
  1/(N−1)·KL(π‖π_ref); rycolab/vbon trains it with PPO, init_kl_coef = 1/(N−1)). Its gradient
  is E_{y~π_θ}[∇log π_θ(y)·(log π_θ(y) − log π_BoN(y))]; we use the REINFORCE surrogate with a
  leave-one-out baseline among the samples of the same prompt (RLOO, Ahmadian et al. 2024,
  arXiv 2402.14740: the baseline of sample i is the mean cost of the prompt's other samples,
  so it does not depend on y_i and the gradient stays unbiased; the paper's exact
  policy-gradient machinery could not be read here):
      L_bwd = (c_i − mean_{j≠i} c_j)·log π_θ(y_i),   c = sg(log π_θ(y) − log π_ref(y) − (n − 1)·log p̂≤(y))
  (a prompt with a single sample has no baseline: c_i itself).

All log-probs are of the policy at the rollouts' sampling temperature T (logits / T), for π_θ
and π_ref alike (finetune/bond_trainer.py): π_BoN is best-of-n of p_T.

Not implemented: J-BOND's iterative moving anchor (EMA of the policy as π_ref, n = 2 per
round); one round against the fixed reference is what `alignserve finetune bond` runs.
All tensors are per prompt [G] or per sample [B]; shapes are given in each function.
"""

from __future__ import annotations

import math

import torch


def bond_forward_loss(policy_logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """−Σ_k w_k·log π_θ(y_k): [G, K] sequence log-probs and BoN weights → [G]."""
    return -(weights.to(policy_logps.dtype) * policy_logps).sum(dim=-1)


def backward_cost(policy_logps: torch.Tensor, ref_logps: torch.Tensor,
                  log_quantiles: torch.Tensor, n: int) -> torch.Tensor:
    """c(y) = log π_θ(y) − log π_ref(y) − (n − 1)·log p̂≤(y), per sample [B]; E_π[c] − log n
    estimates KL(π_θ ‖ π_BoN)."""
    return policy_logps - ref_logps - (n - 1) * log_quantiles


def leave_one_out_baseline(cost: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample [B]: the mean of `cost` over the other samples of its group (`groups` [B]:
    the prompt index of each sample; None: one group); 0 for a sample alone in its group."""
    if groups is None:
        groups = torch.zeros_like(cost, dtype=torch.long)
    size = torch.zeros(int(groups.max()) + 1, dtype=cost.dtype, device=cost.device)
    total = torch.zeros_like(size)
    size.index_add_(0, groups, torch.ones_like(cost))
    total.index_add_(0, groups, cost)
    others = size[groups] - 1
    return torch.where(others > 0, (total[groups] - cost) / others.clamp(min=1),
                       torch.zeros_like(cost))


def bond_backward_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor,
                       log_quantiles: torch.Tensor, n: int,
                       groups: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE surrogate of KL(π_θ ‖ π_BoN) for samples y ~ π_θ, per sample [B]: its
    gradient is (c_i − b_i)·∇log π_θ(y_i) with c = `backward_cost` held constant and b_i the
    leave-one-out baseline over the samples of the same prompt (`groups` [B]: prompt index)."""
    cost = backward_cost(policy_logps, ref_logps, log_quantiles, n).detach()
    return (cost - leave_one_out_baseline(cost, groups)) * policy_logps


def backward_kl_estimate(policy_logps: torch.Tensor, ref_logps: torch.Tensor,
                         log_quantiles: torch.Tensor, n: int) -> float:
    """Monte Carlo KL(π_θ ‖ π_BoN) = mean c(y) − log n (can be < 0: p̂≤ is an estimate)."""
    cost = backward_cost(policy_logps.detach(), ref_logps, log_quantiles, n)
    return float(cost.mean()) - math.log(n)


def jeffreys_loss(forward: torch.Tensor | float, backward: torch.Tensor | float,
                  beta: float) -> torch.Tensor | float:
    """(1 − β)·forward + β·backward (BOND's J_β); β = 0 forward only, β = 1 backward only."""
    return (1.0 - beta) * forward + beta * backward
