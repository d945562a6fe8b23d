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
