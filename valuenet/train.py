"""Offline trainer of prefix value heads on rollouts: CD-FUDGE and CD-Q (Mudgal et al. 2024,
arXiv 2310.17022; FUDGE: Yang & Klein 2021). nanoGPT-style: a dataclass config, an explicit loop.

Data flow: rollout rows (valuenet/data.py) → split by prompt (no prompt in both halves) →
rewards normalised with the training mean/std → per row, a *compact* view of the sequence
x + y: index 0 is the last prompt token (the state "prompt only", prefix length 0), index t the
t-th response token (prefix yᵗ). The backbone runs over the whole sequence once; only the
compact positions are kept.

- Frozen backbone (default): hidden states are computed once and cached, so training only moves
  the head (seconds on CPU).
- LoRA (`tune="lora"`): the backbone runs every step with peft adapters.

CD-Q needs π_ref(z | x, yᵗ), the rollout policy. It is computed once, before training: from the
backbone's own LM head in the caching pass when the backbone is the policy, otherwise (another
backbone, or LoRA) by a frozen reference forward under no_grad. We keep its top-k tokens
(renormalised): the expectation Σ_z π_ref Q then costs k gathered rows of the head instead of
a 49k-wide product per position; `ref_mass` in metrics.json reports the probability retained.
π_ref is the rollouts' sampling distribution (manifest temperature T), since V is the value of
continuing with the distribution the rollouts were drawn from: softmax(logits / T), and at
T = 0 the greedy policy, one-hot at the argmax (`model.policy_probs`). At T = 0 the Bellman
target is therefore v̇ₜ = Q(x, yᵗ, argmax_z p(z|x, yᵗ)), the value of continuing greedily: that
is the value of the policy that drew the rows (greedy rollouts follow the argmax, so the target
is the value of the next realised prefix), whereas the softmax at T = 1 would value a policy
that drew none of them. Such a head matches greedy requests only:
tilting a one-hot p by exp(λ·V) leaves it one-hot, so tokenwise CD at T = 0 is greedy decoding;
at any other temperature the head values the wrong policy, which `scorer.warnings_for` says.
The temperature and top_p are recorded in the checkpoint (HeadConfig.temperature / top_p).

A response cut by the token limit (finish_reason "length"): by default (`truncated="terminal"`)
its last token gets the reward as target, like EOS. The reward in the rollouts was computed on
exactly that cut text, which is also what a decoder with the same max_tokens returns, so the
value is the value under that budget; bootstrapping instead ("bootstrap") would leave cut rows
with no reward signal at all, and short rollouts are mostly cut.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from heads.model import (
    HeadConfig,
    ValueHead,
    hidden_states,
    load_causal_lm,
    pad_batch,
    policy_probs,
    save_checkpoint,
)

from . import report
from .data import Rollout, read_rollouts
from .losses import cdq_loss, fudge_loss, masked_mean_sq

# Defaults scaled to the data (`default_schedule`) when steps / lr are not given.
DEFAULT_EPOCHS, MIN_STEPS, MAX_STEPS = 8, 20, 2000
BASE_LR, FULL_LR_ROWS = 1e-3, 1024


@dataclass
class TrainConfig:
    method: str = "fudge"  # "fudge" | "cdq"
    steps: int | None = None  # None: scaled to the data (`default_schedule`)
    batch_size: int = 16  # rollout rows per step
    lr: float | None = None  # head; None: scaled to the data (`default_schedule`)
    lora_lr: float = 2e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    tune: str = "frozen"  # "frozen" | "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    val_fraction: float = 0.2  # of prompts
    ref_top_k: int = 64  # CD-Q: tokens of π_ref kept per position (≥ vocab: exact)
    truncated: str = "terminal"  # CD-Q, rows cut by length: "terminal" | "bootstrap"
    normalize_rewards: bool = True
    target: str = "reward"  # "reward" | "advantage": r − its prompt's mean reward (see _examples)
    eval_every: int = 0  # steps between validations; 0: about 10 per run
    patience: int = 5  # stop after this many validations without a gain; 0: never stop early
    # "best": save the best step on validation (early stopping); "last": the last step's head
    # (what --steps decides, as in nanoGPT; for capacity checks that overfit on purpose)
    select: str = "best"
    baseline: str | None = None  # scorer applied to validation prefixes (report only)
    cache_batch_size: int = 8
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.method in ("fudge", "cdq"), f"method must be fudge or cdq, not {self.method!r}"),
            (self.tune in ("frozen", "lora"), f"tune must be frozen or lora, not {self.tune!r}"),
            (self.truncated in ("terminal", "bootstrap"), "truncated must be terminal or bootstrap"),
            (self.target in ("reward", "advantage"), "target must be reward or advantage"),
            (self.steps is None or self.steps >= 1, "steps must be ≥ 1"),
            (self.batch_size >= 1, "batch_size must be ≥ 1"),
            ((self.lr is None or self.lr > 0) and self.lora_lr > 0,
             "learning rates must be > 0"),
            (self.patience >= 0, "patience must be ≥ 0"),
            (self.select in ("best", "last"), "select must be best or last"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (self.ref_top_k >= 1, "ref_top_k must be ≥ 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class Example:
    """One rollout in compact form; tensors hold positions 0..L (L = response length)."""

    seq: list[int]  # prompt_ids + token_ids
    start: int  # index in seq of the last prompt token (compact position 0)
    ids: torch.Tensor  # [L+1] seq[start:]
    reward: float  # normalised
    raw_reward: float
    terminal: bool
    hidden: torch.Tensor | None = None  # [L+1, H] (frozen backbone)
    ref_idx: torch.Tensor | None = None  # [L+1, k] (CD-Q)
    ref_p: torch.Tensor | None = None  # [L+1, k]


def rollout_sampling(manifest) -> tuple[float, float]:
    """(temperature, top_p) the rollouts were drawn at; manifests without a top_p were
    sampled at 1 (the only value `alignserve rollouts` has used)."""
    temperature = float(manifest.temperature)
    top_p = float(manifest.extra.get("top_p", 1.0))
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"rollout manifest: temperature {temperature} / top_p {top_p} out of range")
    return temperature, top_p


def _prompt_key(r: Rollout) -> str:
    return r.prompt_id or repr(r.prompt_ids)


def split_by_prompt(rows: list[Rollout], val_fraction: float, seed: int):
    """(train, val): whole prompts go to one side, so no prompt leaks into validation."""
    groups: dict[str, list[Rollout]] = {}
    for r in rows:
        groups.setdefault(_prompt_key(r), []).append(r)
    keys = sorted(groups)
    if len(keys) < 2:
        raise ValueError(f"need rollouts of at least 2 prompts for a train/validation split, got {len(keys)}")
    random.Random(seed).shuffle(keys)
    n_val = min(len(keys) - 1, max(1, round(val_fraction * len(keys))))
    val = [r for k in keys[:n_val] for r in groups[k]]
    train = [r for k in keys[n_val:] for r in groups[k]]
    return train, val


def _examples(rows: list[Rollout], mean: float, std: float, truncated: str,
              target: str = "reward") -> list[Example]:
    """Normalised examples. target "advantage" replaces `mean` by each prompt's own mean
    reward over its rollouts (a Monte Carlo V(x)): the head then fits r − V(x), the part of the
    reward that differs between answers to one prompt. With a frozen backbone and a linear head
    a reward target is mostly spent on telling easy prompts from hard ones (its correlation is as
    high at prefix length 0, where the answers do not exist yet, as at 32); every consumer of a
    value ranks or tilts candidates of one prompt, to which a per-prompt constant is invisible."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(_prompt_key(r), []).append(r.reward)
    base = {k: sum(v) / len(v) if target == "advantage" else mean for k, v in groups.items()}
    out = []
    for r in rows:
        if not r.prompt_ids:
            raise ValueError(f"rollout of prompt {r.prompt_id!r} has no prompt_ids")
        seq = list(r.prompt_ids) + list(r.token_ids)
        start = len(r.prompt_ids) - 1
        terminal = r.finish_reason == "stop" or truncated == "terminal"
        out.append(Example(seq, start, torch.tensor(seq[start:], dtype=torch.long),
                           (r.reward - base[_prompt_key(r)]) / std, r.reward, terminal))
    return out


def _compact_hidden(lm, exs: list[Example]) -> torch.Tensor:
    """Backbone over the full sequences, compact positions kept: [B, Tc, H] (zero padded)."""
    ids, mask = pad_batch([e.seq for e in exs])
    h = hidden_states(lm, ids, mask)
    width = max(len(e.ids) for e in exs)
    out = h.new_zeros(len(exs), width, h.shape[-1])
    for i, e in enumerate(exs):
        out[i, : len(e.ids)] = h[i, e.start : len(e.seq)]
    return out


@torch.no_grad()
def _precompute(lm, ref_lm, exs, cfg: TrainConfig, temperature: float, cache_hidden: bool) -> float:
    """Cache hidden states (frozen backbone) and π_ref top-k (CD-Q); returns the mean π_ref mass
    kept by top-k (1.0 for FUDGE). `ref_lm` None: π_ref from `lm`'s LM head on the same pass."""
    mass, count = 0.0, 0
    bs = cfg.cache_batch_size
    for i in tqdm(range(0, len(exs), bs), desc="backbone pass", disable=not cfg.progress):
        chunk = exs[i : i + bs]
        h = _compact_hidden(lm, chunk) if (cache_hidden or ref_lm is None) else None
        if cfg.method == "cdq":
            hr = h if ref_lm is None else _compact_hidden(ref_lm, chunk)
            logits = (ref_lm or lm).get_output_embeddings()(hr)  # [B, Tc, V]
            k = min(cfg.ref_top_k, logits.shape[-1])
            p, idx = policy_probs(logits, temperature).topk(k, dim=-1)  # T = 0: one-hot
            for j, e in enumerate(chunk):
                n = len(e.ids)
                kept = p[j, :n].sum(-1, keepdim=True)
                mass += float(kept.sum())
                count += n
                e.ref_idx, e.ref_p = idx[j, :n].clone(), (p[j, :n] / kept).clone()
        if cache_hidden:
            for j, e in enumerate(chunk):
                e.hidden = h[j, : len(e.ids)].clone()
    return mass / count if count else 1.0


def _compact_vocabulary(train_ex: list[Example], val_ex: list[Example]) -> torch.Tensor:
    """CD-Q: the token rows that can be trained, and every example's ids remapped onto them.

    Gradient reaches row W_z only when z is a realised response token of a training row (the
    bootstrap targets are stop-gradient), so every other row keeps its zero init (AdamW's
    decoupled decay keeps zero at zero). Training only the realised rows, plus one fixed zero
    row for every other token, is exactly equivalent and turns a 28M-parameter optimiser step
    (SmolLM2: 49152 × 576) into one over a few thousand rows. `_full_head` scatters them back.
    """
    seen = torch.unique(torch.cat([e.ids[1:] for e in train_ex]))
    lookup = torch.full((int(max(e.ids.max() for e in train_ex + val_ex)) + 1,), len(seen),
                        dtype=torch.long)
    lookup[seen] = torch.arange(len(seen))
    top = max(int(e.ref_idx.max()) for e in train_ex + val_ex) + 1
    if top > len(lookup):
        lookup = torch.cat([lookup, torch.full((top - len(lookup),), len(seen), dtype=torch.long)])
    for e in train_ex + val_ex:
        e.ids, e.ref_idx = lookup[e.ids], lookup[e.ref_idx]
    return seen


def _full_head(compact: ValueHead, seen: torch.Tensor, vocab: int) -> ValueHead:
    head = ValueHead("cdq", compact.state.in_features, vocab)
    with torch.no_grad():
        head.state.load_state_dict(compact.state.state_dict())
        head.token.weight[seen] = compact.token.weight[: len(seen)]
        head.token.bias[seen] = compact.token.bias[: len(seen)]
    return head


@dataclass
class Batch:
    h: torch.Tensor  # [B, Tc, H]
    ids: torch.Tensor  # [B, Tc]
    state_mask: torch.Tensor  # [B, Tc]: every prefix state (FUDGE)
    response_mask: torch.Tensor  # [B, Tc]: response tokens (CD-Q)
    reward: torch.Tensor  # [B]
    terminal: torch.Tensor  # [B] bool
    ref_idx: torch.Tensor | None  # [B, Tc, k]
    ref_p: torch.Tensor | None  # [B, Tc, k]


def _batch(exs: list[Example], h: torch.Tensor | None) -> Batch:
    width = max(len(e.ids) for e in exs)
    B = len(exs)
    if h is None:
        h = torch.zeros(B, width, exs[0].hidden.shape[-1])
        for i, e in enumerate(exs):
            h[i, : len(e.ids)] = e.hidden
    ids = torch.zeros(B, width, dtype=torch.long)
    state = torch.zeros(B, width, dtype=torch.bool)
    ref_idx = ref_p = None
    if exs[0].ref_idx is not None:
        k = exs[0].ref_idx.shape[-1]
        ref_idx = torch.zeros(B, width, k, dtype=torch.long)
        ref_p = torch.zeros(B, width, k)  # padding: probability 0 (expected value 0, masked)
    for i, e in enumerate(exs):
        n = len(e.ids)
        ids[i, :n] = e.ids
        state[i, :n] = True
        if ref_idx is not None:
            ref_idx[i, :n], ref_p[i, :n] = e.ref_idx, e.ref_p
    response = state.clone()
    response[:, 0] = False
    return Batch(h, ids, state, response, torch.tensor([e.reward for e in exs]),
                 torch.tensor([e.terminal for e in exs]), ref_idx, ref_p)


def batch_values(head: ValueHead, b: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(V of every prefix state [B, Tc], CD-Q expected next values [B, Tc] or None).
    CD-Q: V at t ≥ 1 is Q[t−1, y_t]; V at t = 0 is Σ_z π_ref Q[0, z] (top-k)."""
    if head.method == "fudge":
        return head.value(b.h), None
    taken = head.q(b.h[:, :-1], b.ids[:, 1:, None]).squeeze(-1)  # [B, Tc−1]
    with torch.no_grad():  # targets only (stop-gradient): no graph over B·Tc·k gathered rows
        expected = (head.q(b.h, b.ref_idx) * b.ref_p).sum(-1)  # [B, Tc]
    return torch.cat([expected[:, :1], taken], dim=1), expected


def batch_loss(head: ValueHead, b: Batch) -> torch.Tensor:
    values, expected = batch_values(head, b)
    if expected is None:
        return fudge_loss(values, b.reward, b.state_mask)
    return cdq_loss(values, expected, b.reward, b.response_mask, b.terminal)


@torch.no_grad()
def evaluate(head, lm, exs: list[Example], cfg: TrainConfig, live: bool) -> dict:
    """Method loss and ½·MSE of V against the reward over all prefix states (both position-
    weighted, normalised units), and every row's prefix values (normalised)."""
    loss_sum = mse_sum = 0.0
    n_loss = n_state = 0
    values: list[list[float]] = []
    for i in range(0, len(exs), cfg.batch_size):
        chunk = exs[i : i + cfg.batch_size]
        b = _batch(chunk, _compact_hidden(lm, chunk) if live else None)
        v, _ = batch_values(head, b)
        positions = b.state_mask if head.method == "fudge" else b.response_mask
        loss_sum += float(batch_loss(head, b)) * float(positions.sum())
        n_loss += int(positions.sum())
        mse_sum += float(masked_mean_sq(v, b.reward[:, None].expand_as(v), b.state_mask)) \
            * float(b.state_mask.sum())
        n_state += int(b.state_mask.sum())
        values.extend(v[j, : len(e.ids)].tolist() for j, e in enumerate(chunk))
    return {"loss": loss_sum / max(n_loss, 1), "value_mse": mse_sum / max(n_state, 1),
            "values": values}


@dataclass
class Prepared:
    """Everything the loop needs, built once: the split, normalisation and cached passes."""

    train_ex: list[Example]
    val_ex: list[Example]
    val_rows: list[Rollout]
    train_prompts: int
    val_prompts: int
    mean: float  # reward normalisation (training rows)
    std: float
    temperature: float  # the rollouts' sampling distribution (π_ref of CD-Q)
    top_p: float
    rollouts_model: str
    lm: torch.nn.Module  # the backbone
    vocab: int
    ref_mass: float  # CD-Q: π_ref probability kept by top-k
    wall: dict[str, float]


def _normalisation(rows: list[Rollout], enabled: bool) -> tuple[float, float]:
    """(mean, std) of the training rewards; (0, 1) when disabled, std 1 for constant rewards."""
    rewards = [r.reward for r in rows]
    mean = sum(rewards) / len(rewards) if enabled else 0.0
    var = sum((x - mean) ** 2 for x in rewards) / len(rewards)
    std = var ** 0.5 if enabled and var > 1e-12 else 1.0
    return mean, std


def _load_backbones(backbone: str, reference: str, exs: list[Example], cfg: TrainConfig):
    """(backbone LM, its vocabulary size, reference LM or None when it is the backbone);
    refuses token ids outside the backbone's vocabulary (another tokenizer)."""
    lm = load_causal_lm(backbone)
    vocab = lm.get_output_embeddings().weight.shape[0]
    too_big = max(max(e.seq) for e in exs)
    if too_big >= vocab:
        raise ValueError(f"token id {too_big} is outside the backbone's vocabulary ({vocab}): "
                         "the backbone must share the policy's tokenizer")
    ref_lm = None if reference == backbone else load_causal_lm(reference)
    if cfg.method == "cdq" and ref_lm is not None and ref_lm.config.vocab_size != vocab:
        raise ValueError("reference and backbone vocabularies differ")
    return lm, vocab, ref_lm


def prepare(data_dir: Path, cfg: TrainConfig, backbone: str, reference: str) -> Prepared:
    """Rollouts → split by prompt → normalised examples → backbones loaded and checked →
    cached hidden states (frozen) and π_ref top-k (CD-Q)."""
    t0 = time.perf_counter()
    manifest, rows = read_rollouts(Path(data_dir))
    if not rows:
        raise ValueError(f"{data_dir} has no rollouts")
    temperature, top_p = rollout_sampling(manifest)
    if cfg.method == "cdq" and top_p != 1.0:  # no producer yet: `alignserve rollouts` uses 1
        raise ValueError(f"rollouts sampled at top_p {top_p}: CD-Q targets under a nucleus "
                         "are not implemented (sample the rollouts at top_p 1)")
    train_rows, val_rows = split_by_prompt(rows, cfg.val_fraction, cfg.seed)
    mean, std = _normalisation(train_rows, cfg.normalize_rewards)
    train_ex = _examples(train_rows, mean, std, cfg.truncated, cfg.target)
    val_ex = _examples(val_rows, mean, std, cfg.truncated, cfg.target)
    lm, vocab, ref_lm = _load_backbones(backbone, reference, train_ex + val_ex, cfg)
    t1 = time.perf_counter()
    ref_mass = _precompute(lm, ref_lm, train_ex + val_ex, cfg, temperature,
                           cache_hidden=cfg.tune == "frozen")
    return Prepared(train_ex, val_ex, val_rows, len({r.prompt_id for r in train_rows}),
                    len({r.prompt_id for r in val_rows}), mean, std, temperature, top_p,
                    manifest.model, lm, vocab, ref_mass,
                    {"load": t1 - t0, "backbone_pass": time.perf_counter() - t1})


def _head_and_optimiser(p: Prepared, cfg: TrainConfig, seen: torch.Tensor | None):
    """(head, backbone — wrapped in LoRA adapters when tuned —, AdamW, trainable parameters)."""
    head = ValueHead(cfg.method, p.lm.config.hidden_size,
                     p.vocab if seen is None else len(seen) + 1)
    params = [{"params": list(head.parameters()), "lr": cfg.lr}]
    lm = p.lm
    if cfg.tune == "lora":
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                           target_modules="all-linear", lora_dropout=0.0))
        params.append({"params": [q for q in lm.parameters() if q.requires_grad],
                       "lr": cfg.lora_lr})
    else:
        lm.requires_grad_(False)
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    return head, lm, opt, [q for g in params for q in g["params"]]


NO_GAIN = "the head does not beat its initialisation on held-out prompts"


def default_schedule(cfg: TrainConfig, train_rows: int) -> tuple[int, float]:
    """(steps, head learning rate): the config's where given, else scaled to the data.

    A heuristic of ours, not from a paper: ~`DEFAULT_EPOCHS` passes over the training rows
    (bounded to [MIN_STEPS, MAX_STEPS]), and the head's rate 1e-3 shrunk by √(rows / 1024)
    below 1,024 rows, so a small rollout set takes small steps from the mean predictor (the
    trainer reported validation 0.14 → 0.25 with 60 steps at 1e-3 on 96 rows, whose training
    loss swung between 0.07 and 0.94 from batch to batch). Early stopping (`train`) guards
    whichever schedule is used."""
    per_epoch = math.ceil(train_rows / cfg.batch_size)
    steps = cfg.steps or min(MAX_STEPS, max(MIN_STEPS, DEFAULT_EPOCHS * per_epoch))
    lr = cfg.lr or BASE_LR * min(1.0, math.sqrt(train_rows / FULL_LR_ROWS))
    return steps, lr


def train(data_dir: Path, out_dir: Path, cfg: TrainConfig, backbone: str,
          reference: str | None = None) -> dict:
    """Train a head on the rollouts in `data_dir`; write the checkpoint, metrics.json and plots
    to `out_dir`. `backbone` / `reference` are resolved folders or HF ids (see runtime.startup.resolve_model);
    reference None: the backbone is the policy. Returns the metrics.

    The head starts as the natural baseline, the training targets' mean everywhere, so the
    initial validation numbers are that baseline's. The checkpoint saved is the best one on
    validation (½·E(V − r)² over all prefix states, step 0 included; the criterion that fits
    both methods: it is E(V − V*)² plus a constant, whereas the CD-Q loss is smallest at the
    start, when every bootstrap target equals its prediction). Training stops early after
    `patience` validations without a gain. When no step beats step 0, the head saved IS the
    baseline (it ranks nothing), metrics say `beats_initialisation: false` and `verdict`
    says NO_GAIN (the CLI exits non-zero: valuenet/cli.py)."""
    cfg.validate()
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    p = prepare(data_dir, cfg, backbone, reference or backbone)
    steps, lr = default_schedule(cfg, len(p.train_ex))
    cfg = replace(cfg, steps=steps, lr=lr)  # recorded in the checkpoint as used
    seen = _compact_vocabulary(p.train_ex, p.val_ex) if cfg.method == "cdq" else None
    head, lm, opt, trainable = _head_and_optimiser(p, cfg, seen)
    with torch.no_grad():  # start at the training mean (0 when rewards are normalised)
        head.state.bias.fill_(sum(e.reward for e in p.train_ex) / len(p.train_ex))
    live = cfg.tune != "frozen"  # LoRA: the backbone runs every step
    t_loop = time.perf_counter()

    initial = evaluate(head, lm, p.val_ex, cfg, live)
    best = (initial["value_mse"], 0, _snapshot(trainable), initial)
    eval_every = cfg.eval_every or max(1, cfg.steps // 10)
    train_curve: list[tuple[int, float]] = []
    val_curve = [(0, initial["loss"])]
    gen = random.Random(cfg.seed)
    order: list[int] = []
    stale = 0  # validations since the last gain
    bar = tqdm(range(1, cfg.steps + 1), desc=f"train {cfg.method}", disable=not cfg.progress)
    for step in bar:
        if len(order) < cfg.batch_size:  # reshuffle per epoch; a step never repeats a row
            order = list(range(len(p.train_ex)))
            gen.shuffle(order)
        picked = [p.train_ex[order.pop()] for _ in range(min(cfg.batch_size, len(order)))]
        b = _batch(picked, _compact_hidden(lm, picked) if live else None)
        loss = batch_loss(head, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        train_curve.append((step, loss.item()))
        if step % eval_every == 0 or step == cfg.steps:
            val = evaluate(head, lm, p.val_ex, cfg, live)
            val_curve.append((step, val["loss"]))
            bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{val['loss']:.4f}")
            if val["value_mse"] < best[0]:
                best, stale = (val["value_mse"], step, _snapshot(trainable), val), 0
            else:
                stale += 1
                if cfg.select == "best" and cfg.patience and stale >= cfg.patience:
                    break
    last_step = train_curve[-1][0]
    if cfg.select == "best":
        _restore(trainable, best[2])  # the best checkpoint, not the last step's
        final = best[3]
    else:
        final = evaluate(head, lm, p.val_ex, cfg, live)
    p.wall["train"] = time.perf_counter() - t_loop

    head = head if seen is None else _full_head(head, seen, p.vocab)
    save_checkpoint(Path(out_dir), head, _head_config(p, cfg, data_dir, backbone,
                                                      reference or backbone),
                    lm if live else None)
    p.wall["total"] = time.perf_counter() - t_start
    gained = final["value_mse"] < initial["value_mse"]  # "best": best_step > 0
    return _write_report(Path(out_dir), p, cfg, backbone, reference or backbone, {
        "initial": initial, "final": final, "best_step": best[1], "last_step": last_step,
        "beats_initialisation": gained, "verdict": None if gained else NO_GAIN,
        "train_curve": train_curve, "val_curve": val_curve})


def _snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [q.detach().clone() for q in params]


def _restore(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for q, v in zip(params, saved):
            q.copy_(v)


def _head_config(p: Prepared, cfg: TrainConfig, data_dir: Path, backbone: str,
                 reference: str) -> HeadConfig:
    return HeadConfig(method=cfg.method, backbone=backbone, reference=reference,
                      hidden_size=p.lm.config.hidden_size, vocab_size=p.vocab,
                      reward_mean=p.mean, reward_std=p.std, lora=cfg.tune != "frozen",
                      temperature=p.temperature, top_p=p.top_p,
                      value_range=_target_range(p),
                      train={**asdict(cfg), "data": str(data_dir), "temperature": p.temperature,
                             "rollouts_model": p.rollouts_model})


def _target_range(p: Prepared) -> list[float]:
    """[lo, hi] of the training targets in reward units (scorers clip the head to it: the
    certified range of tokenwise CD's KL bound, heads/model.py HeadConfig.value_range)."""
    targets = [e.reward * p.std + p.mean for e in p.train_ex]
    return [min(targets), max(targets)]


def _write_report(out_dir: Path, p: Prepared, cfg: TrainConfig, backbone: str, reference: str,
                  run: dict) -> dict:
    """metrics.json, correlation.png and loss.png in `out_dir`; returns the metrics."""
    val_values = [[v * p.std + p.mean for v in row] for row in run["final"]["values"]]
    rewards, prompts = [e.raw_reward for e in p.val_ex], [r.prompt_id for r in p.val_rows]
    curve = report.correlation_by_prefix_length(val_values, rewards)
    within = report.correlation_by_prefix_length(val_values, rewards, prompts)
    cdq = cfg.method == "cdq"
    baseline, baseline_within = (_baseline_curves(p, cfg, backbone) if cfg.baseline
                                 else (None, None))
    metrics = {
        "method": cfg.method, "target": cfg.target, "tune": cfg.tune, "backbone": backbone,
        "reference": reference,
        "train_rows": len(p.train_ex), "val_rows": len(p.val_ex),
        "train_prompts": p.train_prompts, "val_prompts": p.val_prompts,
        "reward_mean": p.mean, "reward_std": p.std,
        "initial_val_loss": run["initial"]["loss"], "val_loss": run["final"]["loss"],
        # the checkpoint saved is the best step's (0: the baseline, i.e. nothing was learned)
        "best_step": run["best_step"], "last_step": run["last_step"],
        "beats_initialisation": run["beats_initialisation"], "verdict": run["verdict"],
        "steps": cfg.steps, "lr": cfg.lr, "value_range": _target_range(p),
        # ½·MSE of V(prefix) vs r; the initial head predicts the training mean: the baseline
        # (val_* are the saved checkpoint's, i.e. the best step's)
        "initial_val_value_mse": run["initial"]["value_mse"],
        "val_value_mse": run["final"]["value_mse"],
        "temperature": p.temperature, "top_p": p.top_p,
        "ref_top_k": cfg.ref_top_k if cdq else None, "ref_mass": p.ref_mass if cdq else None,
        "correlation_by_prefix_length": curve,
        "within_prompt_correlation_by_prefix_length": within,
        "baseline": cfg.baseline, "baseline_correlation_by_prefix_length": baseline,
        "baseline_within_prompt_correlation_by_prefix_length": baseline_within,
        "train_loss": run["train_curve"], "val_curve": run["val_curve"],
        "wall_s": p.wall,
    }
    report.write_json(out_dir / "metrics.json", metrics)
    title = f"{cfg.method} ({len(p.val_ex)} validation rollouts)"
    report.plot_correlation(curve, out_dir / "correlation.png", title,
                            {f"{cfg.baseline} on prefixes": baseline} if baseline else None,
                            f"{cfg.method} head")
    report.plot_losses(run["train_curve"], run["val_curve"], out_dir / "loss.png", title)
    return metrics


def _baseline_curves(p: Prepared, cfg: TrainConfig, backbone: str
                     ) -> tuple[list[dict], list[dict]]:
    """The same correlation curves (pooled, within-prompt) for the scorer `cfg.baseline`
    applied to the validation rows' prefixes (decoded with the backbone's tokenizer, which is
    the policy's)."""
    from transformers import AutoTokenizer

    from runtime.scorers import ScorerRegistry, default_factories

    scorer = ScorerRegistry(default_factories(64), None).load_now(cfg.baseline)
    tok = AutoTokenizer.from_pretrained(backbone)
    values = report.scorer_on_prefixes(
        scorer, lambda ids: tok.decode(ids, skip_special_tokens=True), p.val_rows)
    rewards = [r.reward for r in p.val_rows]
    return (report.correlation_by_prefix_length(values, rewards),
            report.correlation_by_prefix_length(values, rewards,
                                                [r.prompt_id for r in p.val_rows]))
