"""An explicit training loop for completion-level objectives: KLDO and PRO (binary, scalar and
pairwise feedback). nanoGPT-style: tokenise, precompute reference log-probs, then
sample a batch → summed log-probs → loss → AdamW step, with a tqdm bar; then the report's
statistics and a servable checkpoint (trainer.save_model: LoRA merged into full safetensors,
or the adapter alone).

Why not TRL's DPOTrainer as for SafeDPO: KLDO's and unpaired PRO's batches are sets of single
completions with per-completion labels, and KLDO's log-mean-exp term couples the whole batch;
DPOTrainer only knows (chosen, rejected) rows and keeps its loss in one private method. Both
need nothing of TRL but the chat-template tokenisation, which is a few lines here.

Reference log-probs are computed once before the first step: with LoRA by disabling the
adapter, with full fine-tuning from the not-yet-trained weights, so no second model copy.
Sequences are tokenised as the server prompts the policy: the chat template with the user turn
and the generation prompt, then the assistant turn's text (the template's rendering of the
answer, end-of-turn token included); only the answer's tokens are scored.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .losses import sequence_logps
from .trainer import TrainConfig, TrainResult, save_model
from .utils import answer_batch, load_policy


@dataclass
class Encoded:
    ids: list[int]
    prompt_len: int  # tokens before the answer


def encode(tokenizer, prompt: str, answer: str, max_length: int) -> Encoded:
    """Chat-template token ids of (user prompt, assistant answer), cut to `max_length` (the
    answer is cut first; at least one answer token is kept)."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}],
                                         tokenize=False)
    tail = full[len(head):] if full.startswith(head) else answer + (tokenizer.eos_token or "")
    p_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    p_ids = p_ids[-(max_length - 1):]
    return Encoded((p_ids + a_ids)[:max_length], len(p_ids))


def logps(model, items: list[Encoded], pad_id: int) -> torch.Tensor:
    """Summed answer log-probs [len(items)] (with gradients when enabled)."""
    device = next(model.parameters()).device
    ids, attn, answer = answer_batch([(e.ids, e.prompt_len) for e in items], pad_id, device)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    return sequence_logps(logits, ids, answer)


@torch.no_grad()
def logps_all(model, items: list[Encoded], pad_id: int, batch_size: int, desc: str
              ) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = [logps(model, items[i:i + batch_size], pad_id).cpu()
           for i in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", leave=False)]
    model.train(was_training)
    return torch.cat(out).float() if out else torch.zeros(0)


@dataclass
class Objective:
    """A method for the loop: its sequences and how to batch, score and summarise them.

    `sequences`  (prompt, answer) per training sequence;
    `sample`     (rng, batch size) → sequence indices of one step (the objective's layout);
    `loss`       (policy log-probs, reference log-probs) of those indices → scalar loss;
    `stats`      (policy, reference) log-probs of *all* sequences → report statistics."""

    name: str
    sequences: list[tuple[str, str]]
    sample: Callable[[random.Random, int], list[int]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    stats: Callable[[torch.Tensor, torch.Tensor], dict]


def _reference(model, items, pad_id, cfg: TrainConfig, desc: str) -> torch.Tensor:
    if cfg.lora:
        with model.disable_adapter():
            return logps_all(model, items, pad_id, cfg.eval_batch_size, desc)
    return logps_all(model, items, pad_id, cfg.eval_batch_size, desc)


def train_objective(cfg: TrainConfig, train: Objective, held_out: Objective | None,
                    on_step: Callable[..., None] | None = None) -> TrainResult:
    """Fine-tune `cfg.model` on `train` for `cfg.steps` steps and save the checkpoint to
    `cfg.out`; `held_out` (same method, other sequences) only enters the statistics.
    `on_step(step, model, last=cfg.steps)` runs before the first update (step 0) and after
    every optimiser step (finetune/kl_track.py's KL tracking)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    torch.manual_seed(cfg.seed)
    tokenizer, model = load_policy(cfg)
    pad = tokenizer.pad_token_id
    splits = {"train": train, **({"held_out": held_out} if held_out is not None else {})}
    items = {name: [encode(tokenizer, p, a, cfg.max_length) for p, a in obj.sequences]
             for name, obj in splits.items()}
    ref = {name: _reference(model, items[name], pad, cfg, f"reference log-probs ({name})")
           for name in splits}
    before = {name: obj.stats(ref[name], ref[name]) for name, obj in splits.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    curve: list[tuple[int, float]] = []
    model.train()
    if on_step is not None:
        on_step(0, model, last=cfg.steps)
    t0 = time.perf_counter()
    for step in (bar := tqdm(range(1, cfg.steps + 1), desc=train.name, unit="step")):
        idx = train.sample(rng, cfg.batch_size)
        loss = train.loss(logps(model, [items["train"][i] for i in idx], pad), ref["train"][idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as TRL's default max_grad_norm
        optimiser.step()
        if on_step is not None:
            on_step(step, model, last=cfg.steps)
        value = loss.item()
        if math.isfinite(value):
            curve.append((step, value))
        bar.set_postfix(loss=f"{value:.4f}")
    train_s = time.perf_counter() - t0
    after = {name: obj.stats(logps_all(model, items[name], pad, cfg.eval_batch_size,
                                       f"evaluate {name}"), ref[name])
             for name, obj in splits.items()}
    trainable = sum(p.numel() for p in params)
    save_model(model, tokenizer, cfg)
    return TrainResult(curve, before, after, train_s, cfg.steps / train_s, trainable)
