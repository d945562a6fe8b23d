"""KL(π_θ‖π_ref) on held-out prompts through fine-tuning: a sampled estimate with a 95% interval
every K steps, in the report (report.json `kl`, a section of report.md, kl_curve.png), with the
talk's warnings: past 15 nats inspect the answers for reward hacking; past 100 the result is
unlikely to be useful.

Estimator. For each of m held-out prompts x, draw k answers y ~ π_θ(·|x) (temperature 1, no
top-k / top-p, so the sampling law is π_θ itself), then

    KL̂ = mean over the m·k answers of  log π_θ(y|x) − log π_ref(y|x)

which is unbiased for the prompt-averaged KL. The interval is the t interval clustered by prompt
(decoding/intervals.py `mean_interval`; with k answers per prompt it is exactly Student's t on
the m per-prompt means, m − 1 degrees of freedom). Answers are cut at `max_new_tokens`: the
estimate is then the KL of the first tokens' law, a lower bound of the whole answer's KL (data
processing), so a warning from it is never a false alarm. At step 0 the policy is the reference
and every log-ratio is exactly 0: the entry is recorded without sampling.

Cost: m·k answers of `max_new_tokens` tokens and two forward passes, every K steps (defaults
4 × 4 × 32 tokens every 5 steps). The sampling runs inside `torch.random.fork_rng`, seeded by
(seed, step): it neither moves nor depends on the training's random stream.

Reference log-probs: a LoRA policy (PEFT) disables its adapter; a full fine-tune compares with a
frozen copy of the weights taken at step 0 (`freeze_reference`) or a given reference model.
Hooks: `KLTracker.on_step(step, model)` for an explicit loop, `TRLCallback` for TRL trainers,
`measure_checkpoint` for a saved folder against its base after training.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

INSPECT_NATS = 15.0   # the talk: past this, inspect the answers for reward hacking
USELESS_NATS = 100.0  # the talk: past this, the result is unlikely to be useful


@dataclass
class KLTrackConfig:
    every: int = 5             # estimate every K optimiser steps (and at the last); 0: off
    prompts: int = 4           # held-out prompts per estimate
    samples: int = 4           # answers per prompt
    max_new_tokens: int = 32   # tokens per sampled answer
    seed: int = 0


def kl_warning(kl: float) -> str | None:
    """The talk's reading of a KL(π_θ‖π_ref) value in nats, or None below 15."""
    if kl > USELESS_NATS:
        return (f"KL(π_θ‖π_ref) ≈ {kl:.1f} nats > {USELESS_NATS:g}: the fine-tuned policy is "
                "unlikely to be useful")
    if kl > INSPECT_NATS:
        return (f"KL(π_θ‖π_ref) ≈ {kl:.1f} nats > {INSPECT_NATS:g}: inspect its answers for "
                "reward hacking")
    return None


def kl_entry(step: int, per_prompt: Sequence[Sequence[float]], tokens: float) -> dict:
    """One logging step's estimate from per-prompt lists of log π_θ(y) − log π_ref(y):
    {step, kl, ci95 (None with one prompt), answers, prompts, tokens_mean, warning}."""
    from decoding.intervals import mean_interval

    values = [v for g in per_prompt for v in g]
    if not values:
        raise ValueError("KL estimate without samples")
    kl = math.fsum(values) / len(values)
    ci = mean_interval(per_prompt)
    return {"step": step, "kl": kl, "ci95": list(ci) if ci is not None else None,
            "answers": len(values), "prompts": sum(1 for g in per_prompt if len(g)),
            "tokens_mean": tokens, "warning": kl_warning(kl)}


@dataclass
class KLTracker:
    """Collects `kl_entry`s through training (module docstring)."""

    cfg: KLTrackConfig
    prompts: list[str]        # the held-out prompts (first `cfg.prompts` are used)
    model_path: str           # base policy: tokenizer and reference ("" in tests: deepcopy)
    source: str = "held_out"  # where the prompts come from (held_out | train)
    entries: list[dict] = field(default_factory=list)
    reference: object = None  # frozen reference for full fine-tuning (not needed with LoRA)
    _tokenizer: object = None

    def due(self, step: int, last: int) -> bool:
        return self.cfg.every > 0 and step not in self.steps and (
            step == last or step % self.cfg.every == 0)

    @property
    def steps(self) -> set[int]:
        return {e["step"] for e in self.entries}

    def record_reference(self) -> None:
        """Step 0: π_θ = π_ref, every log-ratio is 0 (no sampling needed)."""
        if 0 not in self.steps:
            m = min(self.cfg.prompts, len(self.prompts))
            self._add(kl_entry(0, [[0.0] * self.cfg.samples for _ in range(m)], 0.0))

    def freeze_reference(self, model) -> None:
        """Keep a frozen copy of a fully fine-tuned model's starting weights (LoRA: none):
        loaded again from `model_path` (a deepcopy of a model inside a trainer can keep calling
        the original's forward, which accelerate may have wrapped), else a deepcopy."""
        if self.reference is not None or _is_peft(model):
            return
        if self.model_path:
            import torch
            from transformers import AutoModelForCausalLM

            ref = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
            self.reference = ref.to(next(model.parameters()).device)
        else:
            self.reference = copy.deepcopy(model)
        self.reference.eval().requires_grad_(False)

    def on_step(self, step: int, model, last: int | None = None) -> None:
        """Hook of an explicit loop, after optimiser step `step` (of `last`)."""
        if step == 0:
            self.freeze_reference(model)
            self.record_reference()
        elif self.due(step, last if last is not None else -1):
            self.measure(step, model)

    def measure(self, step: int, policy, reference=None) -> dict:
        """Sample from `policy` and add the entry for `step`. `reference`: a model, else the
        frozen copy, else the policy with its LoRA adapter disabled."""
        import torch

        ref = reference if reference is not None else self.reference
        if ref is None and not _is_peft(policy):
            raise ValueError("KL tracking of a full fine-tune needs a reference model")
        tok = self.tokenizer()
        was_training = policy.training
        policy.eval()
        per_prompt, lengths = [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed * 1_000_003 + step)
            for prompt in self.prompts[:self.cfg.prompts]:
                diffs, n_tok = _prompt_log_ratios(policy, ref, tok, prompt, self.cfg)
                per_prompt.append(diffs)
                lengths += n_tok
        policy.train(was_training)
        return self._add(kl_entry(step, per_prompt, sum(lengths) / max(1, len(lengths))))

    def measure_checkpoint(self, step: int, folder: Path) -> dict:
        """The saved policy in `folder` (merged weights or a LoRA adapter) against the base."""
        import torch
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        if (Path(folder) / "adapter_config.json").is_file():
            from peft import PeftModel

            return self.measure(step, PeftModel.from_pretrained(base, str(folder)))
        policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return self.measure(step, policy, reference=base.eval())

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            if self._tokenizer.pad_token is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    def _add(self, entry: dict) -> dict:
        self.entries = sorted([*self.entries, entry], key=lambda e: e["step"])
        if entry["warning"]:
            log.warning("step %d: %s", entry["step"], entry["warning"])
        return entry

    def summary(self) -> dict:
        """report.json's `kl`: config, prompt source, entries, warnings, the last entry."""
        return {"config": asdict(self.cfg), "prompts_source": self.source,
                "entries": self.entries,
                "warnings": [f"step {e['step']}: {e['warning']}" for e in self.entries
                             if e["warning"]],
                "final": self.entries[-1] if self.entries else None,
                "thresholds": {"inspect": INSPECT_NATS, "useless": USELESS_NATS}}


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _prompt_log_ratios(policy, reference, tok, prompt: str, cfg: KLTrackConfig
                       ) -> tuple[list[float], list[int]]:
    """k answers to `prompt` from `policy`: their log π_θ − log π_ref and lengths (tokens,
    the end-of-turn token included)."""
    import contextlib

    import torch
    from transformers import GenerationConfig

    from .losses import sequence_logps

    device = next(policy.parameters()).device
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(head, add_special_tokens=False)["input_ids"]], device=device)
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        out = policy.generate(input_ids=ids.repeat(cfg.samples, 1),
                              attention_mask=torch.ones_like(ids).repeat(cfg.samples, 1),
                              generation_config=gen)  # [k, P + T]
        answer = out[:, ids.shape[1]:]
        ended = (answer == tok.eos_token_id).long()
        after_eos = (ended.cumsum(1) - ended) > 0  # tokens after the first end-of-turn
        mask = torch.zeros_like(out)
        mask[:, ids.shape[1]:] = (~after_eos).long()
        lp = sequence_logps(policy(input_ids=out, use_cache=False).logits, out, mask)
        ctx = policy.disable_adapter() if reference is None else contextlib.nullcontext()
        with ctx:
            ref_model = policy if reference is None else reference
            lr = sequence_logps(ref_model(input_ids=out, use_cache=False).logits, out, mask)
    return (lp - lr).cpu().double().tolist(), mask.sum(1).cpu().tolist()


def trl_callback(tracker: KLTracker):
    """A `transformers.TrainerCallback` that runs the tracker at the start and every K steps."""
    from transformers import TrainerCallback

    class KLCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            tracker.on_step(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            tracker.on_step(state.global_step, model, last=state.max_steps)

    return KLCallback()


def held_out_prompts(eval_examples: Sequence, train_examples: Sequence) -> tuple[list[str], str]:
    """Distinct prompts of the held-out examples (in their order), else the training ones."""
    for examples, source in ((eval_examples, "held_out"), (train_examples, "train")):
        prompts = list(dict.fromkeys(e.prompt for e in examples))
        if prompts:
            return prompts, source
    return [], "none"


def plot_kl(path: Path, kl: dict, title: str) -> None:
    from runtime.plotting import pyplot, save

    plt = pyplot()
    entries = kl["entries"]
    steps = [e["step"] for e in entries]
    vals = [e["kl"] for e in entries]
    lo = [e["kl"] - e["ci95"][0] if e["ci95"] else 0.0 for e in entries]
    hi = [e["ci95"][1] - e["kl"] if e["ci95"] else 0.0 for e in entries]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(steps, vals, yerr=[lo, hi], marker="o", capsize=3, label="KL̂ (95% CI)")
    top = max([v + h for v, h in zip(vals, hi, strict=True)] + [1.0])
    for level, label in ((INSPECT_NATS, "inspect for reward hacking"),
                         (USELESS_NATS, "unlikely to be useful")):
        if top > 0.5 * level:
            ax.axhline(level, ls="--", color="C3", alpha=0.6, label=f"{level:g} nats: {label}")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(π_θ‖π_ref), nats")
    ax.set_title(title)
    save(fig, ax, path)


def markdown(kl: dict) -> str:
    c = kl["config"]
    lines = ["## KL(π_θ‖π_ref) through training", "",
             f"{c['prompts']} {kl['prompts_source'].replace('_', '-')} prompts × {c['samples']} "
             f"answers sampled from π_θ (temperature 1, ≤ {c['max_new_tokens']} tokens) every "
             f"{c['every']} steps; KL̂ = mean log π_θ(y) − log π_ref(y), 95% t interval "
             "clustered by prompt; truncated answers make it a lower bound.", "",
             "| step | KL̂ (nats) | 95% CI | answers | mean tokens | warning |",
             "|---:|---:|---|---:|---:|---|"]
    for e in kl["entries"]:
        ci = f"{e['ci95'][0]:.3f} – {e['ci95'][1]:.3f}" if e["ci95"] else "—"
        lines.append(f"| {e['step']} | {e['kl']:.3f} | {ci} | {e['answers']} | "
                     f"{e['tokens_mean']:.1f} | {e['warning'] or ''} |")
    lines += ["", *(f"- **warning**: {w}" for w in kl["warnings"]), "",
              "![KL through training](kl_curve.png)", ""]
    return "\n".join(lines)


def write_kl_report(out: Path, kl: dict, title: str) -> None:
    """kl_curve.png and a section appended to report.md (report.json carries `kl` already)."""
    plot_kl(out / "kl_curve.png", kl, title)
    report_md = out / "report.md"
    with report_md.open("a", encoding="utf-8") as f:
        f.write("\n" + markdown(kl))
