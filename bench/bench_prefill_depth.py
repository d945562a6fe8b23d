"""Does the harmful-prefix → recovery augmentation deepen SafeDPO's alignment? (Qi et al. 2024,
arXiv 2406.05946: §3.1's augmentation, measured with their prefill attack.)

Two stages, each one heavy run (run them through the queue lock):
- `--stage train`: SafeDPO on the shipped synthetic pairs, `--steps` LoRA steps, twice with the
  same seed and flags: plain, and with `--augment-prefill K_MAX` (finetune/augment.py: one
  recovery example per pair with a safe chosen and a harmful rejected answer). The flag is not
  on `alignserve finetune` yet, so this script runs the command's own steps (`_prepare`,
  `augment.apply`, `_train_and_report`) as `finetune.cli.train_checkpoint` does.
- `--stage eval`: `alignserve eval --prefill` with the plain policy (`none`) of the base model
  and both checkpoints, the same attacks, seeds and tokens; writes OUT/prefill_depth.md, .json
  and prefill_depth.png (attack success against prefilled tokens k, Wilson intervals).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from common import ALIGNSERVE, ROOT

SYNTHETIC = ROOT / "finetune" / "data" / "synthetic_safety.jsonl"
WORK = Path.home() / ".cache" / "alignserve" / "bench-prefill-depth"


def train(work: Path, name: str, steps: int, k_max: int | None) -> dict:
    from finetune import augment
    from finetune.cli import PROG, _prepare, _train_and_report, add_arguments

    out = work / name
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    parser = argparse.ArgumentParser(prog=PROG)
    add_arguments(parser)
    ns = parser.parse_args(["safedpo", "--data", str(SYNTHETIC), "--out", str(out), "--steps",
                            str(steps), "--kl-every", str(steps)])
    ns.augment_prefill = k_max
    model, train_ex, eval_ex, data, lam, beta = _prepare(ns)
    train_ex, data["train"] = augment.apply(ns, train_ex, data["train"], model)
    return _train_and_report(ns, model, train_ex, eval_ex, data, lam, beta)


def evaluate(work: Path, policies: dict[str, str], args) -> list[dict]:
    rows = []
    for name, model in policies.items():
        out = work / f"eval-{name}"
        if not (out / "prefill.json").is_file():
            subprocess.run([ALIGNSERVE, "eval", "--prefill", args.prefill, "--strategies",
                            "none", "--model", model, "--cost", "profanity", "--max-tokens",
                            str(args.max_tokens), "--limit", str(args.limit), "--seed", "0",
                            "--out", str(out)], check=True)
        doc = json.loads((out / "prefill.json").read_text())
        rows += [{**r, "label": name} for r in doc["attack"]]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("train", "eval"), required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--k-max", type=int, default=32, help="--augment-prefill K_MAX.")
    ap.add_argument("--prefill", default="8,24")
    ap.add_argument("--limit", type=int, default=24, help="Attacks (pairs with a harmful answer).")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    plain, augmented = "safedpo", f"safedpo+augment-{args.k_max}"
    if args.stage == "train":
        for name, k in ((plain, None), (augmented, args.k_max)):
            report = train(args.work, name, args.steps, k)
            kl = (report.get("kl") or {}).get("final") or {}
            held = report["after"].get("held_out", {})
            print(f"{name}: train {report['train_s']:.0f} s, held-out {held}, KL "
                  f"{kl.get('kl')} {kl.get('ci95')}, data {report['data']['train']}")
        return
    from evaluation import prefill

    policies = {"base": "embedded", plain: str(args.work / plain),
                augmented: str(args.work / augmented)}
    rows = evaluate(args.work, policies, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_depth.json").write_text(json.dumps(
        {"policies": policies, "steps": args.steps, "k_max": args.k_max, "limit": args.limit,
         "max_tokens": args.max_tokens, "attack": rows}, indent=2) + "\n")
    (args.out / "prefill_depth.md").write_text("\n".join(prefill.markdown(rows)))
    prefill.plot(args.out / "prefill_depth.png", rows)


if __name__ == "__main__":
    main()
