"""Best-of-n distillation (BOND) vs best-of-n of the base policy: reward, KL, compute per answer.

1. `alignserve rollouts` of the base policy on the training prompts
   (finetune/data/bond_prompts.jsonl, disjoint from the dev prompts), K = 8, reward relevance,
   cost profanity;
2. `alignserve finetune bond --rollouts … --n 8` (BOND's Jeffreys divergence, β_J = 0.5, LoRA
   merged) → a servable checkpoint;
3. held-out prompts (bench/prompts-dev.jsonl): 16 base samples per prompt give best-of-n at
   n = 4, 8, 16 from disjoint groups of n samples (16/n answers per prompt), with the KL bound
   log n − (n−1)/n and Beirami's estimate from log p(chosen answer), the numbers the server
   reports for best-of-n (decoding/kl.py, decoding/strategies.py);
4. the distilled policy's samples on the same prompts at n = 1: mean reward and the Monte Carlo
   KL(π_bond ‖ π_ref) = mean log π_bond(y) − log π_ref(y) (its own log-probs from the engine,
   the reference's from a transformers forward of the base model on the same token ids).
Compute per answer: generated tokens (all n samples for best-of-n) and the wall time those
tokens cost at the run's measured batched throughput (tokens ÷ tok/s of that policy's rollout
run; the machine is shared, so wall times are indicative). Writes OUT/bond.md and bond.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path

from bench_safedpo import run_rollouts
from common import ALIGNSERVE, ROOT

WORK = Path(os.environ.get("ALIGNSERVE_HOME", Path.home() / ".cache" / "alignserve")) / "bench-bond"
TRAIN_PROMPTS = ROOT / "finetune" / "data" / "bond_prompts.jsonl"
DEV_PROMPTS = ROOT / "bench" / "prompts-dev.jsonl"
BASE_K = 16  # base samples per held-out prompt (best-of-16 needs them all)


def throughput(folder: Path) -> float | None:
    """tok/s of the rollout run that filled `folder` (its run.txt summary line), or None."""
    path = folder / "run.txt"
    m = re.search(r"\((\d+) rows, (\d+) tokens\) in ([\d.]+) s", path.read_text()) \
        if path.is_file() else None
    return int(m.group(2)) / float(m.group(3)) if m else None


def base_dev_rollouts(work: Path, max_tokens: int) -> Path:
    out = work / "rollouts-base-dev"
    run_rollouts("embedded", DEV_PROMPTS, out, BASE_K, max_tokens)
    return out


def bond_checkpoint(work: Path, n: int, steps: int, max_tokens: int) -> Path:
    """Train rollouts (K = 8) and `finetune bond` into work/bond (both reused when present)."""
    train = work / "rollouts-train"
    run_rollouts("embedded", TRAIN_PROMPTS, train, 8, max_tokens)
    ckpt = work / "bond"
    if not (ckpt / "config.json").is_file():
        subprocess.run([ALIGNSERVE, "finetune", "bond", "--rollouts", str(train), "--n", str(n),
                        "--steps", str(steps), "--eval-prompts", "6", "--out", str(ckpt)],
                       check=True)
    return ckpt


def by_prompt(rows) -> dict[str, list]:
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r.prompt_id, []).append(r)
    return {k: sorted(v, key=lambda r: r.sample) for k, v in groups.items()}


def best_of(rows, n: int) -> list:
    """Best-of-n answers from disjoint groups of n samples per prompt: (chosen row, group)."""
    out = []
    for samples in by_prompt(rows).values():
        for i in range(0, len(samples) - n + 1, n):
            group = samples[i:i + n]
            out.append((max(group, key=lambda r: r.reward), group))
    return out


def bon_summary(rows, n: int, tok_s: float | None) -> dict:
    from decoding.kl import bon_kl_bound, bon_kl_estimate

    picks = best_of(rows, n)
    tokens = sum(len(r.token_ids) for _, g in picks for r in g) / len(picks)
    kl_hat = [bon_kl_estimate(n, min(0.0, sum(c.logprobs))) for c, _ in picks]
    return {"policy": "base", "n": n, "answers": len(picks),
            "mean_reward": sum(c.reward for c, _ in picks) / len(picks),
            "kl_bound": bon_kl_bound(n), "kl_estimate": sum(kl_hat) / len(kl_hat),
            "tokens_per_answer": tokens, "wall_s_per_answer": tokens / tok_s if tok_s else None}


def reference_logps(rows, base: str | Path) -> list[float]:
    """log π_ref(y) of each row's exact token ids under the base model (transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.bond_trainer import answer_logps

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            chunk = rows[i:i + 16]
            out += answer_logps(model, [r.prompt_ids for r in chunk],
                                [r.token_ids for r in chunk], pad, 4096).tolist()
    return out


def distilled_summary(rows, base, tok_s: float | None) -> dict:
    ref = reference_logps(rows, base)
    ratio = [sum(r.logprobs) - q for r, q in zip(rows, ref)]
    tokens = sum(len(r.token_ids) for r in rows) / len(rows)
    return {"policy": "bond", "n": 1, "answers": len(rows),
            "mean_reward": sum(r.reward for r in rows) / len(rows), "kl_bound": None,
            "kl_estimate": sum(ratio) / len(ratio), "tokens_per_answer": tokens,
            "wall_s_per_answer": tokens / tok_s if tok_s else None}


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(results: list[dict], args, training: dict) -> str:
    lines = ["# BOND-distilled policy (n = 1) vs best-of-n of the base policy\n",
             f"Held-out prompts: {DEV_PROMPTS.name} (40, helpful and adversarial), "
             f"{args.max_tokens} new tokens, temperature 1.0, reward `relevance`. BOND: "
             f"best-of-{args.n} distilled from 8 base samples on each of the 40 training prompts "
             f"(finetune/data/bond_prompts.jsonl), β_J 0.5, {args.steps} steps, LoRA merged "
             f"(training {training.get('train_s', float('nan')):.0f} s). One run.\n",
             "| policy | n | answers | mean reward | KL bound | KL estimate | tokens / answer "
             "| wall s / answer |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['policy']} | {r['n']} | {r['answers']} | {r['mean_reward']:.3f} | "
                     f"{_fmt(r['kl_bound'])} | {_fmt(r['kl_estimate'])} | "
                     f"{r['tokens_per_answer']:.1f} | {_fmt(r['wall_s_per_answer'], '.2f')} |")
    lines += ["", "KL for best-of-n: the bound and Beirami et al.'s estimate, as the server "
              "reports them; for the distilled policy: the Monte Carlo mean of log π_bond(y) − "
              "log π_ref(y) over its samples (no bound: it is a new policy). Wall s / answer: "
              "tokens per answer ÷ the batched tok/s measured in that policy's rollout run on "
              "this shared 2-core machine (indicative only)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="The best-of-n to distil.")
    ap.add_argument("--steps", type=int, default=12, help="BOND steps.")
    ap.add_argument("--samples", type=int, default=4, help="Distilled samples per prompt.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    from finetune.common import resolve_model
    from valuenet.rollouts import read_rollouts

    ckpt = bond_checkpoint(args.work, args.n, args.steps, args.max_tokens)
    base_dir = base_dev_rollouts(args.work, args.max_tokens)
    bond_dir = args.work / "rollouts-bond-dev"
    run_rollouts(str(ckpt), DEV_PROMPTS, bond_dir, args.samples, args.max_tokens)
    _, base_rows = read_rollouts(base_dir)
    _, bond_rows = read_rollouts(bond_dir)
    base_tok_s = throughput(base_dir)
    results = [bon_summary(base_rows, n, base_tok_s) for n in (1, 4, 8, 16)]
    results.append(distilled_summary(bond_rows, resolve_model("embedded", None),
                                     throughput(bond_dir)))
    training = json.loads((ckpt / "report.json").read_text())
    md = markdown(results, args, training)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bond.md").write_text(md)
    (args.out / "bond.json").write_text(json.dumps(
        {"results": results, "training": {k: training[k] for k in
                                          ("config", "data", "train_s", "before", "after")}},
        indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
