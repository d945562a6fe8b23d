"""Preference fine-tuning on TRL's `DPOTrainer` (TRL 1.16), with SafeDPO's per-pair offset.

Why `DPOTrainer` and how the offset gets in. TRL 1.16 computes the whole loss in one private
method (`_compute_loss`, ~300 lines) with no per-example margin hook. Its sigmoid loss is
−log σ(β·[(log π_w − ref_w) − (log π_l − ref_l)]), and with `precompute_ref_log_probs=True` the
reference log-probs `ref_w`, `ref_l` travel in the batch. SafeDPO's loss
−log σ(β·[...] − o), o = (h̃_l − h̃_w)·Δ, is the same expression with ref_w replaced by ref_w + o/β,
so `SafeDPOTrainer` shifts `ref_chosen_logps` by o/β in `compute_loss` and leaves TRL's loss,
tokenisation (chat template, prompt/completion split, truncation), LoRA wrapping, optimiser and
progress bars untouched. With Δ = 0 (MoCAN) no column is added and it is plain TRL DPO.

Consequence: TRL's own logged `rewards/*` metrics include the offset (−o on the chosen reward).
The report therefore computes its margins and accuracies here (`evaluate_pairs`), without it.

Reference log-probs are computed once, before the first step: with LoRA by disabling the adapter
(TRL's `use_adapter`), with full fine-tuning from the not-yet-trained policy, so no second model
copy is held in either case (`ref_model=None` + precompute).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm import tqdm
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .losses import pair_stats, sequence_logps
from .safedpo import DPOExample
from .utils import ensure_pad_token, lora_config, readable_by_umask

OFFSET = "safety_offset"  # dataset column / batch key: o = (h̃_l − h̃_w)·Δ per pair


@dataclass
class TrainConfig:
    model: Path
    out: Path
    beta: float = 0.1
    steps: int = 20
    lr: float = 5e-5
    batch_size: int = 4
    max_length: int = 160
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    save_adapter: bool = False
    seed: int = 0
    eval_batch_size: int = 8


@dataclass
class TrainResult:
    loss_curve: list[tuple[int, float]]  # (step, training loss) as logged by the trainer
    before: dict[str, dict]              # split -> pair_stats at step 0 (policy = reference)
    after: dict[str, dict]               # split -> pair_stats after training
    train_s: float
    steps_per_s: float
    trainable_params: int


@dataclass
class OffsetCollator(DataCollatorForPreference):
    """TRL's preference collator that also carries the per-pair SafeDPO offset."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        if OFFSET in examples[0]:
            batch[OFFSET] = torch.tensor([float(e[OFFSET]) for e in examples])
        return batch


class SafeDPOTrainer(DPOTrainer):
    """`DPOTrainer` whose logit is β·(log-ratio_w − log-ratio_l) − o (module docstring)."""

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if OFFSET not in self._signature_columns:  # else Trainer drops the column
            self._signature_columns = [*self._signature_columns, OFFSET]

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, _without_offset(inputs))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if OFFSET in inputs:
            offset = inputs[OFFSET]
            inputs = _without_offset(inputs)
            ref = inputs["ref_chosen_logps"]
            inputs["ref_chosen_logps"] = ref + offset.to(ref.device, ref.dtype) / self.beta
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _without_offset(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != OFFSET}


def to_dataset(examples: list[DPOExample], offsets: list[float] | None) -> Dataset:
    """Conversational rows, so that TRL applies the policy's chat template (as at serving)."""
    rows = []
    for i, ex in enumerate(examples):
        row = {"prompt": [{"role": "user", "content": ex.prompt}],
               "chosen": [{"role": "assistant", "content": ex.chosen}],
               "rejected": [{"role": "assistant", "content": ex.rejected}]}
        if offsets is not None:
            row[OFFSET] = float(offsets[i])
        rows.append(row)
    return Dataset.from_list(rows)


def _dpo_config(cfg: TrainConfig, workdir: str) -> DPOConfig:
    return DPOConfig(
        output_dir=workdir, beta=cfg.beta, learning_rate=cfg.lr, max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        max_length=cfg.max_length, precompute_ref_log_probs=True,
        precompute_ref_batch_size=cfg.eval_batch_size,
        # float32 on CPU: bf16 autocast is several times slower without AVX-512 (DESIGN-NOTES §3);
        # checkpointing trades compute for memory we do not need for a 135M model.
        bf16=False, fp16=False, gradient_checkpointing=False,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )


@torch.no_grad()
def evaluate_pairs(trainer: DPOTrainer, dataset: Dataset, beta: float, desc: str) -> dict:
    """pair_stats of the current policy on a prepared dataset (tokenised, with ref log-probs).
    Plain forward + log-softmax here (not TRL's fused head), so the numbers do not depend on it."""
    model = trainer.model
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=trainer.args.per_device_eval_batch_size,
                        collate_fn=trainer.data_collator, shuffle=False)
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("pc", "pr", "rc", "rr", "o")}
    device = next(model.parameters()).device
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logps = sequence_logps(logits, ids, batch["completion_mask"].to(device)).cpu()
        chosen, rejected = logps.chunk(2)  # the collator stacks [chosen..., rejected...]
        cols["pc"].append(chosen)
        cols["pr"].append(rejected)
        cols["rc"].append(batch["ref_chosen_logps"])
        cols["rr"].append(batch["ref_rejected_logps"])
        cols["o"].append(batch.get(OFFSET, torch.zeros(len(chosen))))
    model.train(was_training)
    t = {k: torch.cat(v).float() for k, v in cols.items()}
    return pair_stats(t["pc"], t["pr"], t["rc"], t["rr"], t["o"], beta)


def _reference_stats(dataset: Dataset, beta: float) -> dict:
    """Step-0 statistics: before the first update the policy *is* the reference (LoRA's B = 0;
    full fine-tuning starts from the same weights), so every log-ratio is 0 and z = −o."""
    ref_c = torch.tensor(dataset["ref_chosen_logps"], dtype=torch.float32)
    ref_r = torch.tensor(dataset["ref_rejected_logps"], dtype=torch.float32)
    offset = (torch.tensor(dataset[OFFSET], dtype=torch.float32) if OFFSET in dataset.column_names
              else torch.zeros_like(ref_c))
    return pair_stats(ref_c, ref_r, ref_c, ref_r, offset, beta)


def train(cfg: TrainConfig, train_examples: list[DPOExample], eval_examples: list[DPOExample],
          delta: float, kl_tracker=None) -> TrainResult:
    """Fine-tune `cfg.model` on the pairs and save a servable checkpoint to `cfg.out`;
    `kl_tracker` (finetune/kl_track.py `KLTracker`) estimates KL(π_θ‖π_ref) every K steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .kl_track import trl_callback
    from .safedpo import safety_offsets

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the hub on trainer start
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    # Δ = 0 (DPO, MoCAN): no offset column at all, so TRL's loss runs unchanged.
    train_ds = to_dataset(train_examples, safety_offsets(train_examples, delta) if delta else None)
    eval_ds = (to_dataset(eval_examples, safety_offsets(eval_examples, delta) if delta else None)
               if eval_examples else None)
    with tempfile.TemporaryDirectory(prefix="alignserve-finetune-") as workdir:
        trainer = SafeDPOTrainer(
            model=model, args=_dpo_config(cfg, workdir), train_dataset=train_ds,
            eval_dataset=eval_ds, processing_class=tokenizer,
            data_collator=OffsetCollator(pad_token_id=ensure_pad_token(tokenizer),
                                         max_length=cfg.max_length),
            peft_config=lora_config(cfg) if cfg.lora else None,
            callbacks=[trl_callback(kl_tracker)] if kl_tracker is not None else None,
        )
        splits = {"train": trainer.train_dataset}
        if trainer.eval_dataset is not None:
            splits["held_out"] = trainer.eval_dataset
        before = {name: _reference_stats(ds, cfg.beta) for name, ds in splits.items()}
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        after = {name: evaluate_pairs(trainer, ds, cfg.beta, f"evaluate {name}")
                 for name, ds in splits.items()}
        curve = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history
                 if "loss" in e and math.isfinite(e["loss"])]
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        save_checkpoint(trainer, tokenizer, cfg)
    return TrainResult(curve, before, after, train_s, trainer.state.global_step / train_s,
                       trainable)


def save_checkpoint(trainer: DPOTrainer, tokenizer, cfg: TrainConfig) -> None:
    """`save_model` of the trainer's model."""
    save_model(trainer.model, tokenizer, cfg)


def save_model(model, tokenizer, cfg: TrainConfig) -> None:
    """A servable folder: merged weights (LoRA folded in) as safetensors + tokenizer +
    generation_config, same architecture and vocabulary as the base; or, with `save_adapter`,
    the LoRA adapter alone (adapter_config.json + adapter_model.safetensors). Also used by
    finetune/loop.py (KLDO, PRO)."""
    from peft import PeftModel

    cfg.out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel) and not cfg.save_adapter:
        model = model.merge_and_unload()
    model.save_pretrained(cfg.out, safe_serialization=True)
    tokenizer.save_pretrained(cfg.out)
    generation = getattr(model, "generation_config", None)
    if generation is not None and not (cfg.out / "generation_config.json").exists():
        generation.save_pretrained(cfg.out)
    readable_by_umask(cfg.out)
