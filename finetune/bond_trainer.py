"""BOND / vBoN training loop in plain torch (finetune/bond_losses.py for the objective).

Why not TRL: the forward term needs K weighted sequences per prompt and the backward term
on-policy samples scored by our own scorer registry and ranked against the prompt's reference
rewards; neither fits a TRL trainer without overriding its core, and the loop is short.

One step, for `batch_prompts` training prompts:
1. forward term (β < 1): log π_θ of the prompt's K reference samples (the rollouts' token ids,
   prompt_ids + token_ids, never re-tokenised) → −Σ_k w_k·log π_θ(y_k);
2. backward term (β > 0): `policy_samples` answers y ~ π_θ per prompt (HF generate at the
   rollouts' temperature and max_tokens), reward r(y) from the rollouts' scorer, log p̂≤(y) against
   the prompt's K reference rewards, log π_ref(y) with the LoRA adapter disabled (with --full, a
   frozen copy of the start weights) → REINFORCE surrogate;
3. (1 − β)·fwd + β·bwd, AdamW step.

Temperature. The rollouts were drawn from p_T (logits / T, T = the manifest's temperature), so
π_BoN is best-of-n of p_T, and their stored log π_ref are at T. Every log-prob here is therefore
taken from logits / T too (`answer_logps(..., temperature=T)`), for π_θ and π_ref alike, and the
backward term samples π_θ at T: what is trained is the *tempered* policy π_θ,T. Serve the
distilled checkpoint at the same temperature T; it is then exactly π_θ,T (the weights are not
pre-divided by T, so serving at T does not apply T twice, and serving at 1 would not be the
policy that was trained).
The result is saved like SafeDPO's (finetune/trainer.py `save_checkpoint`): merged safetensors
that `/admin/policies` hot-swaps in, or the LoRA adapter.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from .bond import BondGroup, bon_weights, log_quantile
from .bond_losses import (
    backward_kl_estimate,
    bond_backward_loss,
    bond_forward_loss,
    jeffreys_loss,
)
from .losses import sequence_logps
from .utils import answer_batch, load_policy


@dataclass
class BondConfig:
    model: Path | str
    out: Path
    reward: str                  # scorer name (the rollouts' reward)
    n: int = 8                   # the best-of-n to distil
    jeffreys_beta: float = 0.5   # β of J_β: 0 forward only, 1 backward only (vBoN)
    steps: int = 20
    lr: float = 1e-4
    batch_prompts: int = 2
    policy_samples: int = 2      # on-policy samples per prompt for the backward term
    max_new_tokens: int = 64
    temperature: float = 1.0
    max_length: int = 256        # prompt + answer tokens (longer answers are cut)
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    save_adapter: bool = False
    seed: int = 0
    length_target: int = 64      # of the `length` scorer, if that is the reward
    eval_prompts: int = 8        # prompts per split in the before/after report (0: all)


@dataclass
class BondResult:
    loss_curve: list[tuple[int, float]]
    before: dict[str, dict]
    after: dict[str, dict]
    train_s: float
    steps_per_s: float
    trainable_params: int
    log: list[dict] = field(default_factory=list)  # per step: loss, fwd, bwd, kl, reward


def answer_logps(model, prompt_ids: list[list[int]], answers: list[list[int]], pad_id: int,
                 max_length: int, temperature: float = 1.0) -> torch.Tensor:
    """Σ_t log π_T(answer_t | prompt, answer_<t) for each (prompt, answer) → [B] (with grad),
    π_T = softmax(logits / T): the policy at sampling temperature T (module docstring)."""
    seqs = [((p + a)[:max_length], len(p)) for p, a in zip(prompt_ids, answers)]
    device = next(model.parameters()).device
    ids, attn, comp = answer_batch(seqs, pad_id, device)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    return sequence_logps(logits / temperature, ids, comp)


@torch.no_grad()
def sample_answers(model, group: BondGroup, k: int, cfg: BondConfig,
                   eos_ids: set[int], pad_id: int) -> list[list[int]]:
    """k answers y ~ π_θ for one prompt (token ids, cut after the first end-of-sequence id,
    which is kept, as vLLM keeps it)."""
    device = next(model.parameters()).device
    prompt = torch.tensor([group.prompt_ids], device=device)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                         temperature=cfg.temperature, top_p=1.0, top_k=0,
                         max_new_tokens=cfg.max_new_tokens, num_return_sequences=k,
                         pad_token_id=pad_id)
    answers = []
    for row in out[:, prompt.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        answers.append(row[:cut])
    return answers


def forward_term(model, groups: list[BondGroup], cfg: BondConfig, pad_id: int) -> torch.Tensor:
    """Mean over prompts of −Σ_k w_k·log π_θ(y_k) (scalar, with grad)."""
    prompts = [g.prompt_ids for g in groups for _ in g.samples]
    answers = [s for g in groups for s in g.samples]
    logps = answer_logps(model, prompts, answers, pad_id, cfg.max_length, cfg.temperature)
    losses, start = [], 0
    for g in groups:
        w = torch.tensor(bon_weights(g.rewards, cfg.n), device=logps.device)
        losses.append(bond_forward_loss(logps[start:start + len(g.samples)], w))
        start += len(g.samples)
    return torch.stack(losses).mean()


def _ref_logps(model, ref_model, prompts, answers, pad_id, max_length,
               temperature: float) -> torch.Tensor:
    with torch.no_grad():
        if ref_model is not None:
            return answer_logps(ref_model, prompts, answers, pad_id, max_length, temperature)
        with model.disable_adapter():  # PEFT: the base weights are π_ref
            return answer_logps(model, prompts, answers, pad_id, max_length, temperature)


def backward_term(model, ref_model, groups: list[BondGroup], scorer, tokenizer,
                  cfg: BondConfig, eos_ids: set[int], pad_id: int) -> tuple[torch.Tensor, dict]:
    """REINFORCE surrogate of KL(π_θ ‖ π_BoN) on fresh samples (scalar) + diagnostics."""
    prompts, answers, logq, rewards, group_of = [], [], [], [], []
    was_training = model.training
    model.eval()
    for gi, g in enumerate(groups):
        ys = sample_answers(model, g, cfg.policy_samples, cfg, eos_ids, pad_id)
        texts = tokenizer.batch_decode(ys, skip_special_tokens=True)
        scores = [float(s) for s in scorer.score(g.prompt, texts)]
        prompts += [g.prompt_ids] * len(ys)
        group_of += [gi] * len(ys)  # the leave-one-out baseline is per prompt
        answers += ys
        rewards += scores
        logq += [log_quantile(s, g.rewards) for s in scores]
    model.train(was_training)
    pol = answer_logps(model, prompts, answers, pad_id, cfg.max_length, cfg.temperature)
    ref = _ref_logps(model, ref_model, prompts, answers, pad_id, cfg.max_length, cfg.temperature)
    q = torch.tensor(logq, device=pol.device)
    loss = bond_backward_loss(pol, ref, q, cfg.n,
                              torch.tensor(group_of, device=pol.device)).mean()
    stats = {"kl_bwd": backward_kl_estimate(pol.detach(), ref, q, cfg.n),
             "log_ratio": float((pol.detach() - ref).mean()),
             "reward": sum(rewards) / len(rewards), "quantile": math.exp(sum(logq) / len(logq))}
    return loss, stats


@torch.no_grad()
def evaluate(model, groups: list[BondGroup], cfg: BondConfig, pad_id: int) -> dict:
    """Forward term (BoN-weighted NLL, nats per answer) and the mean log-prob of each prompt's
    best reference sample, over the first `cfg.eval_prompts` prompts of a split (the report
    costs K + 1 forward passes per prompt: on 2 CPU cores a few prompts are enough)."""
    groups = groups[:cfg.eval_prompts] if cfg.eval_prompts else groups
    if not groups:
        return {}
    was_training = model.training
    model.eval()
    fwd, best = [], []
    for g in groups:
        fwd.append(float(forward_term(model, [g], cfg, pad_id)))
        k = max(range(len(g.rewards)), key=g.rewards.__getitem__)
        best.append(float(answer_logps(model, [g.prompt_ids], [g.samples[k]], pad_id,
                                       cfg.max_length, cfg.temperature)[0]))
    model.train(was_training)
    return {"prompts": len(groups), "loss": sum(fwd) / len(fwd),
            "best_sample_logp": sum(best) / len(best)}


def _load(cfg: BondConfig):
    """The policy (LoRA or full), a frozen reference copy where the backward term needs one and
    full fine-tuning leaves no adapter to disable, and the ids that end a sampled answer."""
    tokenizer, model = load_policy(cfg)
    ref_model = None
    if not cfg.lora and cfg.jeffreys_beta > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return tokenizer, model, ref_model, eos_ids - {None}


def _num(x: torch.Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def train_bond(cfg: BondConfig, train: list[BondGroup], held_out: list[BondGroup],
               scorer=None) -> BondResult:
    """Distil best-of-n into `cfg.model` and save a servable checkpoint to `cfg.out`.
    `scorer` (a Scorer: score(prompt, texts)) is needed when β > 0."""
    from .trainer import save_checkpoint

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer, model, ref_model, eos_ids = _load(cfg)
    pad_id = tokenizer.pad_token_id
    before = {"train": evaluate(model, train, cfg, pad_id)}
    if held_out:
        before["held_out"] = evaluate(model, held_out, cfg, pad_id)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    order: list[int] = []
    curve, log = [], []
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc=f"bond n={cfg.n}", unit="step")
    for step in bar:
        if len(order) < cfg.batch_prompts:  # reshuffle once every prompt was seen
            order += rng.sample(range(len(train)), len(train))
        batch = [train[order.pop(0)] for _ in range(min(cfg.batch_prompts, len(train)))]
        fwd = forward_term(model, batch, cfg, pad_id) if cfg.jeffreys_beta < 1 else 0.0
        bwd, stats = (backward_term(model, ref_model, batch, scorer, tokenizer, cfg, eos_ids,
                                    pad_id) if cfg.jeffreys_beta > 0 else (0.0, {}))
        loss = jeffreys_loss(fwd, bwd, cfg.jeffreys_beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        entry = {"step": step, "loss": _num(loss), "fwd": _num(fwd), **stats}
        log.append(entry)
        curve.append((step, entry["loss"]))
        bar.set_postfix({k: f"{v:.3g}" for k, v in entry.items() if k != "step"})
    train_s = time.perf_counter() - t0
    after = {"train": evaluate(model, train, cfg, pad_id)}
    if held_out:
        after["held_out"] = evaluate(model, held_out, cfg, pad_id)
    trainable = sum(p.numel() for p in params)
    # save_checkpoint reads only `.model` of its trainer argument
    save_checkpoint(SimpleNamespace(model=model), tokenizer, cfg)
    return BondResult(curve, before, after, train_s, cfg.steps / train_s, trainable, log)
