"""BOND's Jeffreys-divergence objective as pure torch functions (arXiv 2407.14622).

BOND minimises, per prompt, the Jeffreys divergence between the policy π_θ and π_BoN:

    J_β(π_θ) = (1 − β)·KL(π_BoN ‖ π_θ) + β·KL(π_θ ‖ π_BoN),     β ∈ [0, 1] (paper: β = 0.5)

- forward term KL(π_BoN ‖ π_θ) = −E_{y~π_BoN}[log π_θ(y)] + const: maximum likelihood on
  best-of-n samples (mode covering). Here the expectation is exact over the K reference samples
  of a prompt, with the empirical BoN weights w_k (finetune/bond.py `bon_weights`):
      L_fwd = −Σ_k w_k·log π_θ(y_k)
- backward term KL(π_θ ‖ π_BoN) (mode seeking) with log π_BoN(y) ≈ log n + log π_ref(y)
  + (n − 1)·log p≤(y) (the n·π_ref·p≤ⁿ⁻¹ form, exact without ties):
      KL(π_θ ‖ π_BoN) = E_{y~π_θ}[log π_θ(y) − log π_ref(y) − (n − 1)·log p≤(y)] − log n
  i.e. a KL-regularised RL problem with reward log p≤(y) and KL weight 1/(n − 1) once divided by
  n − 1, which is exactly vBoN's objective (Amini et al., arXiv 2407.06057: max E[log F(r)] −
  1/(N−1)·KL(π‖π_ref); rycolab/vbon trains it with PPO, init_kl_coef = 1/(N−1)). Its gradient
  is E_{y~π_θ}[∇log π_θ(y)·(log π_θ(y) − log π_BoN(y))]; we use the REINFORCE surrogate with a
  batch-mean baseline (the paper's exact policy-gradient machinery could not be read here):
      L_bwd = (c − mean(c))·log π_θ(y),   c = sg(log π_θ(y) − log π_ref(y) − (n − 1)·log p̂≤(y))

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


def bond_backward_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor,
                       log_quantiles: torch.Tensor, n: int) -> torch.Tensor:
    """REINFORCE surrogate of KL(π_θ ‖ π_BoN) for samples y ~ π_θ, per sample [B]: its
    gradient is (c − mean c)·∇log π_θ(y) with c = `backward_cost` held constant."""
    cost = backward_cost(policy_logps, ref_logps, log_quantiles, n).detach()
    return (cost - cost.mean()) * policy_logps


def backward_kl_estimate(policy_logps: torch.Tensor, ref_logps: torch.Tensor,
                         log_quantiles: torch.Tensor, n: int) -> float:
    """Monte Carlo KL(π_θ ‖ π_BoN) = mean c(y) − log n (can be < 0: p̂≤ is an estimate)."""
    cost = backward_cost(policy_logps.detach(), ref_logps, log_quantiles, n)
    return float(cost.mean()) - math.log(n)


def jeffreys_loss(forward: torch.Tensor | float, backward: torch.Tensor | float,
                  beta: float) -> torch.Tensor | float:
    """(1 − β)·forward + β·backward (BOND's J_β); β = 0 forward only, β = 1 backward only."""
    return (1.0 - beta) * forward + beta * backward
