"""Value-head losses: CD-FUDGE regression and CD-Q Bellman targets (Mudgal et al. 2024,
arXiv 2310.17022, §3; FUDGE: Yang & Klein 2021).

Every function works on position-aligned tensors of one batch, `[B, T]` (row, position):
position i of a row holds the state "the sequence up to and including token i". Positions are
selected by masks, so the same functions serve full sequences (prompt + response + padding,
the LoRA path) and the trainer's compact rows (index 0 = the last prompt token, then the
response tokens: the frozen-backbone cache).

- CD-FUDGE: V(x, yᵗ) is read at the last token of x + yᵗ; every prefix, the bare prompt (yᵗ
  with t = 0) included, regresses on the final reward r:  ½ Σₜ (V_θ(x, yᵗ) − r)².
- CD-Q: a vocabulary-sized head gives Q[i, z] = V(x, s≤i, z) for every next token z at once.
  The value of the realised prefix ending at position i is Q[i−1, s_i] ("taken" values). Its
  target is v̇ᵢ = Σ_z π_ref(z | s≤i) · Q[i, z] (stop-gradient) before the end of the response
  and r at the end: ½ Σₜ (V_θ(x, yᵗ) − v̇ₜ)².

Losses are means over the selected positions (not sums), so the learning rate does not depend
on the response length or batch size.
"""

from __future__ import annotations

import torch


def masked_mean_sq(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """½ · mean over mask of (pred − target)²; 0 (with a gradient path) when the mask is empty."""
    m = mask.to(pred.dtype)
    return 0.5 * ((pred - target) ** 2 * m).sum() / m.sum().clamp_min(1.0)


def fudge_loss(values: torch.Tensor, reward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CD-FUDGE. values [B, T] = V(prefix ending at position i); reward [B]; mask [B, T] marks
    the prefix states that count (the last prompt token and every response token)."""
    return masked_mean_sq(values, reward[:, None].expand_as(values), mask)


def taken_values(q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """V(prefix ending at i) = Q[i−1, ids[i]] for a full head q [B, T, V] and ids [B, T].
    Position 0 has no predecessor in the row and gets 0 (mask it out)."""
    taken = q[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T−1]
    return torch.cat([taken.new_zeros(taken.shape[0], 1), taken], dim=1)


def expected_q(q: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Σ_z π(z | s≤i) · Q[i, z]: q and probs [B, T, V] → [B, T] (V(x, s≤i) under π_ref)."""
    return (q * probs).sum(-1)


def cdq_targets(
    expected: torch.Tensor,
    reward: torch.Tensor,
    response_mask: torch.Tensor,
    terminal: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bellman targets [B, T] (detached).

    expected [B, T]: Σ_z π_ref(z|s≤i) Q[i, z]; reward [B]; response_mask [B, T]: 1 at response
    tokens; terminal [B] bool (default all True): whether the row's last response token ends
    the episode. A terminal last token gets r; every other response token, and the last token of
    a non-terminal row, gets the bootstrapped expected value. Positions outside the mask get 0.
    """
    mask = response_mask.bool()
    B, T = mask.shape
    # index of the last response token of each row (rows without response tokens: none)
    pos = torch.arange(T, device=mask.device).expand(B, T)
    last = torch.where(mask, pos, torch.full_like(pos, -1)).max(dim=1).values  # [B]
    is_last = (pos == last[:, None]) & mask
    if terminal is None:
        terminal = torch.ones(B, dtype=torch.bool, device=mask.device)
    use_reward = is_last & terminal[:, None]
    target = torch.where(use_reward, reward[:, None].to(expected.dtype).expand(B, T), expected)
    return torch.where(mask, target, torch.zeros_like(target)).detach()


def cdq_loss(
    taken: torch.Tensor,
    expected: torch.Tensor,
    reward: torch.Tensor,
    response_mask: torch.Tensor,
    terminal: torch.Tensor | None = None,
) -> torch.Tensor:
    """CD-Q: ½ mean over response tokens of (V_θ(prefix) − v̇)², v̇ from `cdq_targets`."""
    target = cdq_targets(expected, reward, response_mask, terminal)
    return masked_mean_sq(taken, target, response_mask)
