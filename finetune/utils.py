"""What the training recipes share: batching, loading the policy, LoRA, saving readable weights.

One copy of each helper that the four training styles (TRL's DPOTrainer in trainer.py, the
explicit loop in loop.py, BOND's on-policy loop in bond_trainer.py, the aligner's SFT in
aligner.py) used to carry on their own. torch, transformers and peft are imported inside the
functions: aligner.py imports this module and is itself imported by the `alignserve finetune`
parser at every `alignserve` start, which must stay light (tests/unit/test_distribution.py).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

# the attention and MLP projections of the Llama-shaped policies; PEFT's "all-linear" picks
# the same set and leaves the (tied) LM head out
ALL_LINEAR = "all-linear"


class LoraSettings(Protocol):
    """What `lora_config` reads of a recipe's config."""

    lora_r: int
    lora_alpha: int


class PolicySettings(LoraSettings, Protocol):
    """What `load_policy` reads of a recipe's config (TrainConfig, BondConfig)."""

    model: Path | str
    lora: bool


def right_pad(rows: Sequence[Sequence[int]], fill: int, width: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows left-aligned in a [B, T] long tensor, the rest `fill`, and the [B, T] mask of real
    tokens (1) — the layout every causal-LM batch here uses (T = the longest row, or `width`)."""
    import torch

    width = max(len(r) for r in rows) if width is None else width
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, :len(row)] = 1
    return out, mask


def answer_batch(seqs: Sequence[tuple[Sequence[int], int]], pad_id: int, device=None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, prompt length) per sequence → right-padded ids [B, T], attention mask and
    answer mask (1 from the prompt's end to the row's end: the tokens `sequence_logps` scores)."""
    ids, attn = right_pad([tokens for tokens, _ in seqs], pad_id)
    answer = attn.clone()
    for i, (_, n_prompt) in enumerate(seqs):
        answer[i, :n_prompt] = 0
    return ids.to(device), attn.to(device), answer.to(device)


def ensure_pad_token(tokenizer) -> int:
    """The pad id, with end-of-sequence standing in where the tokenizer has no pad token (the
    padded positions are masked out, so which id fills them does not matter)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


def lora_config(cfg: LoraSettings, target_modules: str | list[str] = ALL_LINEAR):
    """PEFT's LoraConfig of a recipe: rank and alpha from its flags, no dropout, the attention
    and MLP projections (vLLM serves adapters on both)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=target_modules, task_type="CAUSAL_LM")


def load_policy(cfg: PolicySettings, target_modules: str | list[str] = ALL_LINEAR):
    """(tokenizer with a pad token, float32 causal LM) of `cfg.model`, wrapped in a fresh LoRA
    adapter on `target_modules` when `cfg.lora`: float32 because bf16 autocast is several times
    slower on CPUs without AVX-512 (DESIGN-NOTES §3)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    if cfg.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg, target_modules))
    return tokenizer, model


def readable_by_umask(folder: Path) -> None:
    """Give the files in `folder` the umask's mode. Weights are written 0600 (through a private
    temp file); a server running as another user (e.g. the image's uid 10001) could not load or
    hot-swap them."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def pick_indices(rng: random.Random, pool: list[int], k: int) -> list[int]:
    """k distinct indices when the pool has them, else the pool plus draws with replacement."""
    if k <= len(pool):
        return rng.sample(pool, k)
    return pool + rng.choices(pool, k=k - len(pool))


def pick_balanced(rng: random.Random, pos: list[int], neg: list[int], batch: int) -> list[int]:
    """About half a batch from each side (⌈batch/2⌉, at least one): the completion-level
    objectives (KLDO, binary PRO, RDRO) need both labels in every step's batch."""
    half = max(1, (batch + 1) // 2)
    return pick_indices(rng, pos, half) + pick_indices(rng, neg, half)
