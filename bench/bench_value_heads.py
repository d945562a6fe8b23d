"""Value heads that earn their place: FUDGE and CD-Q heads trained on rollouts of
valuenet/data/prompts-train.jsonl, their validation correlation with the final reward by prefix
length on held-out prompts, next to the reward scorer applied to the same prefixes (the
baseline a head must beat to be worth serving; Mudgal et al. 2024, arXiv 2310.17022).

Pipeline (each step reused when its output exists under --work):
  1. `alignserve rollouts --prompts valuenet/data/prompts-train.jsonl --n 8 --max-tokens 64`
     (resumable; --limit takes a balanced subset: the file alternates helpful / adversarial);
  2. `alignserve train-value --method fudge --baseline REWARD`, `--method cdq` and
     `--method fudge --target advantage` (HEADS), same seed and validation fraction, hence the
     same held-out prompts; the correlation curves are the trainer's own (valuenet/report.py),
     the baseline is computed there once;
  3. one correlation.png with the curves and value_heads.md with the table.
The dev prompts (bench/prompts-dev.jsonl) are not in the training set, so bench_cd.py can
benchmark these heads on prompts neither head has seen.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from common import ALIGNSERVE, ROOT

from valuenet import report


def offline_steps(args) -> dict[str, dict]:
    """Rollouts (resumed) and both heads; returns method → metrics.json."""
    rollouts = args.work / "rollouts"
    if not args.skip_rollouts:
        cmd = [ALIGNSERVE, "rollouts", "--prompts", str(args.prompts), "--n", str(args.n),
               "--max-tokens", str(args.max_tokens), "--reward", args.reward, "--engine-seed",
               "0", "--out", str(rollouts)]
        subprocess.run(cmd + (["--limit", str(args.limit)] if args.limit else []), check=True)
    out = {}
    for name, flags in HEADS.items():
        head = args.work / f"head-{name}"
        if not (head / "metrics.json").is_file() or args.fresh:
            cmd = [ALIGNSERVE, "train-value", "--data", str(rollouts), *flags,
                   "--steps", str(args.steps), "--val-fraction", str(args.val_fraction),
                   "--out", str(head), "--no-progress"]
            subprocess.run(cmd + (["--baseline", args.reward] if name == "fudge" else []),
                           check=True)
        out[name] = json.loads((head / "metrics.json").read_text())
    return out


HEADS = {  # checkpoint name → train-value flags; same seed and split, so the same held-out prompts
    "fudge": ["--method", "fudge"],
    "cdq": ["--method", "cdq"],
    "fudge-adv": ["--method", "fudge", "--target", "advantage"],
}


CURVES = {  # column → (head, metrics key)
    "FUDGE head": ("fudge", "correlation_by_prefix_length"),
    "CD-Q head": ("cdq", "correlation_by_prefix_length"),
    "reward on prefixes": ("fudge", "baseline_correlation_by_prefix_length"),
    "FUDGE, within prompt": ("fudge", "within_prompt_correlation_by_prefix_length"),
    "CD-Q, within prompt": ("cdq", "within_prompt_correlation_by_prefix_length"),
    "FUDGE advantage, within prompt": ("fudge-adv", "within_prompt_correlation_by_prefix_length"),
    "reward on prefixes, within prompt": ("fudge",
                                          "baseline_within_prompt_correlation_by_prefix_length"),
}


def table(metrics: dict[str, dict], reward: str) -> str:
    """One row per prefix-length bucket, one column per curve the heads' metrics hold (the
    within-prompt curves exist for heads trained since train-value reports them)."""
    cols = {name: metrics[m][key] for name, (m, key) in CURVES.items()
            if metrics.get(m, {}).get(key)}
    names = [n.replace("reward", f"`{reward}`") for n in cols]
    lines = ["| prefix length t | points | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(cols)]

    def fmt(x):
        return "–" if x is None else f"{x:.3f}"

    for i, f in enumerate(metrics["fudge"]["correlation_by_prefix_length"]):
        span = f"{f['lo']}" if f["hi"] - f["lo"] == 1 else f"{f['lo']}–{f['hi'] - 1}"
        lines.append(f"| {span} | {f['points']} | "
                     + " | ".join(fmt(c[i]["pearson"]) for c in cols.values()) + " |")
    return "\n".join(lines)


def write_report(metrics: dict[str, dict], args) -> str:
    fudge = metrics["fudge"]
    report.plot_correlations(
        {name.replace("reward", args.reward): metrics[m][key]
         for name, (m, key) in CURVES.items() if metrics.get(m, {}).get(key)},
        args.out / "correlation.png",
        f"held-out prompts: {fudge['val_prompts']} ({fudge['val_rows']} rollouts)")
    heads = "\n".join(
        f"| {m['method']}, {m.get('target', 'reward')} | {m['train_prompts']} / "
        f"{m['train_rows']} | {m['val_prompts']} / {m['val_rows']} | "
        f"{m['initial_val_value_mse']:.3f} → {m['val_value_mse']:.3f} | "
        f"{m['wall_s']['total']:.0f} |" for m in metrics.values())
    md = [
        "# Value heads: correlation with the final reward by prefix length\n",
        f"Rollouts: `alignserve rollouts` over {args.prompts.relative_to(ROOT)} "
        f"({fudge['train_prompts'] + fudge['val_prompts']} prompts sampled, helpful and "
        f"adversarial alternating), {args.n} samples each, {args.max_tokens} new tokens, "
        f"temperature 1, reward `{args.reward}`; heads: frozen SmolLM2-135M backbone (the policy), "
        f"{args.steps} steps, batch 16; validation: {args.val_fraction:.0%} of the prompts "
        f"held out (whole prompts). {os.cpu_count()} CPU cores shared with other jobs; one run.\n",
        "Pearson correlation over every (rollout, prefix t) pair in a bucket of t between the "
        "prediction at prefix t and the rollout's final reward r(x, y), on the held-out prompts; "
        "'within prompt': each point centred on its prompt's means first, i.e. how well a value "
        "ranks the candidates of one prompt, which is what blockwise CD and SpR ask of it. "
        "Baseline: the reward scorer itself applied to the decoded prefix, r(x, yᵗ) — what "
        f"blockwise CD with `value: {args.reward}` acts on.\n",
        table(metrics, args.reward), "",
        "![correlation](correlation.png)\n",
        "| head (method, target) | train prompts / rows | val prompts / rows | val ½·MSE (normalised), "
        "mean predictor → trained | train-value wall s |", "|---|---|---|---|---|", heads, "",
    ]
    text = "\n".join(md)
    (args.out / "value_heads.md").write_text(text)
    (args.out / "value_heads.json").write_text(json.dumps(
        {m: {k: v for k, v in metrics[m].items() if k not in ("train_loss",)} for m in metrics},
        indent=2) + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=Path,
                    default=ROOT / "valuenet" / "data" / "prompts-train.jsonl")
    ap.add_argument("--limit", type=int, default=0, help="Prompts rolled out (0: all).")
    ap.add_argument("--n", type=int, default=8, help="Rollouts per prompt.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reward", default="relevance")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get(
        "ALIGNSERVE_HOME", Path.home() / ".cache" / "alignserve")) / "value-heads")
    ap.add_argument("--skip-rollouts", action="store_true",
                    help="Use the rollouts already under --work as they are.")
    ap.add_argument("--fresh", action="store_true", help="Retrain the heads.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(write_report(offline_steps(args), args))


if __name__ == "__main__":
    main()
