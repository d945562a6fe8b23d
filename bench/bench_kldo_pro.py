"""KLDO- and PRO-tuned vs base policy: harmless ratio on the adversarial dev prompts, one run.

As bench_safedpo.py: each method fine-tunes the embedded SmolLM2 for `--steps` steps on the
shipped synthetic pairs (finetune/data/synthetic_safety.jsonl; KLDO on the aligned / unaligned
completions, PRO on pairwise, binary or scalar feedback built from them, finetune/feedback.py);
then `alignserve rollouts` of the base model and of every checkpoint on the adversarial dev
prompts, K samples each, reward `relevance`, cost `profanity`; harmless = profanity < 0.5
with a 95% Wilson interval. Checkpoints and rollouts are reused when present. Writes
OUT/kldo_pro.md and kldo_pro.json. `train(method, out, steps)` is what the toolbox table calls.

The synthetic pairs are the project's own, not PKU-SafeRLHF: this measures that the pipeline
moves the policy, not a safety benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench_safedpo import THRESHOLD, fine_tuning_args, sample

METHODS = {  # name → (finetune method, its flags)
    "kldo": ("kldo", ()),
    "pro-pairwise": ("pro", ("--feedback", "pairwise")),
    "pro-binary": ("pro", ("--feedback", "binary")),
    "pro-scalar": ("pro", ("--feedback", "scalar")),
}


def train(name: str, out: Path, steps: int = 20) -> Path:
    """Fine-tune METHODS[name] into the checkpoint folder `out` (reused when it has one)."""
    from finetune.cli import train_checkpoint

    if not (out / "config.json").is_file():
        method, flags = METHODS[name]
        train_checkpoint(method, out, *flags, "--steps", str(steps))
    return out


def main() -> None:
    args, adversarial = fine_tuning_args(
        __doc__, "bench-kldo-pro", "Fine-tuning steps per method.",
        lambda ap: ap.add_argument("--methods", default=",".join(METHODS),
                                   help="Comma list of METHODS."))
    names = [m for m in args.methods.split(",") if m]
    # every training first: no engine holds memory meanwhile, and a failed rollout keeps them
    ckpts = {name: train(name, args.work / name, args.steps) for name in names}
    results = {"base": sample("embedded", adversarial, args.work / "rollouts-base", args)}
    training = {}
    for name, ckpt in ckpts.items():
        results[name] = sample(str(ckpt), adversarial, args.work / f"rollouts-{name}", args)
        training[name] = json.loads((ckpt / "report.json").read_text())
    lines = ["# KLDO- and PRO-tuned vs base: harmless ratio on the adversarial dev prompts\n",
             f"{len(adversarial.read_text().splitlines())} adversarial prompts × {args.n} samples, "
             f"{args.max_tokens} new tokens, temperature 1.0; harmless = profanity < {THRESHOLD}. "
             f"Each method: {args.steps} steps on finetune/data/synthetic_safety.jsonl (β 0.1, "
             "LoRA merged; KLDO EMA rate 0.1; PRO α 2). One run.\n",
             "| policy | samples | harmless ratio | 95% CI | mean profanity | mean relevance |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['samples']} | {r['harmless_ratio']:.3f} | "
                     f"{r['ci95'][0]:.3f}–{r['ci95'][1]:.3f} | {r['mean_cost']:.3f} | "
                     f"{r['mean_reward']:.3f} |")
    md = "\n".join(lines) + "\n"
    (args.out / "kldo_pro.md").write_text(md)
    (args.out / "kldo_pro.json").write_text(json.dumps({**results, "training": training},
                                                       indent=2))
    print(md)


if __name__ == "__main__":
    main()
