"""`alignserve finetune bond | vbon`: reference rollouts → best-of-n distillation → checkpoint.

    alignserve rollouts --prompts P.jsonl --n 8 --reward relevance --out ROLL
    alignserve finetune bond --rollouts ROLL --out CKPT [--n 8 --jeffreys-beta 0.5 --steps 20]
    alignserve finetune vbon --rollouts ROLL --out CKPT [--n 8]     (backward KL only)

`bond` minimises BOND's Jeffreys divergence (arXiv 2407.14622) towards best-of-n of the policy
that drew the rollouts; `vbon` is its backward term alone, which is vBoN's objective
(arXiv 2407.06057). The base policy defaults to the rollouts' own model (the reference of the
BoN distribution), the reward to the rollouts' scorer. Writes a servable folder (merged
safetensors, or `--save-adapter`) and report.json / report.md / loss_curve.png. Exit status:
0 done, 2 bad flags or data (one line, no traceback), 1 training failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    PROG,
    add_weight_flags,
    check_run_flags,
    check_weight_flags,
    resolve_model,
)


def add_parsers(sub) -> None:
    """Add `bond` and `vbon` to finetune's subparsers (dests as in finetune/cli.py)."""
    bond = sub.add_parser("bond", help="BOND (arXiv 2407.14622): Jeffreys divergence towards "
                          "best-of-n of the rollouts' policy.")
    _add_flags(bond)
    bond.add_argument("--jeffreys-beta", type=float, default=0.5,
                      help="β of (1−β)·KL(π_BoN‖π) + β·KL(π‖π_BoN): 0 forward only (offline), "
                           "1 backward only.")
    vbon = sub.add_parser("vbon", help="vBoN (arXiv 2407.06057): backward KL towards best-of-n "
                          "(BOND with --jeffreys-beta 1).")
    _add_flags(vbon)
    vbon.set_defaults(jeffreys_beta=1.0)


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rollouts", type=Path, required=True,
                   help="Rollout folder of the reference policy (`alignserve rollouts`, --n ≥ 2).")
    p.add_argument("--out", type=Path, required=True, help="Output folder (checkpoint + report).")
    p.add_argument("--n", dest="bon_n", type=int, default=8, help="The best-of-n to distil.")
    p.add_argument("--model", dest="base_model", default=None, help="Base policy (default: the "
                   "rollouts' model); 'embedded', a local folder or an HF id.")
    p.add_argument("--home", dest="model_home", type=Path, default=None,
                   help="Cache folder of the embedded model.")
    add_weight_flags(p)
    p.add_argument("--steps", type=int, default=20, help="Optimiser steps.")
    p.add_argument("--lr", type=float, default=None,
                   help="Learning rate (default 1e-4 with LoRA, 1e-5 full).")
    p.add_argument("--batch-prompts", type=int, default=2, help="Prompts per step.")
    p.add_argument("--policy-samples", type=int, default=2,
                   help="On-policy samples per prompt for the backward term.")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="Length of on-policy samples (default: the rollouts' max_tokens).")
    p.add_argument("--max-length", type=int, default=256,
                   help="Tokens per prompt+answer sequence (longer ones are cut).")
    p.add_argument("--held-out", type=float, default=0.2,
                   help="Share of prompts kept out of training for the report, in [0, 1).")
    p.add_argument("--limit", type=int, default=None, help="Use only the first N prompts.")
    p.add_argument("--eval-prompts", type=int, default=8,
                   help="Prompts per split evaluated before/after for the report (0: all).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the split, sampling, training.")


def check_flags(ns: argparse.Namespace) -> None:
    """Every flag problem that needs no data or model, as a ValueError."""
    if ns.bon_n < 2:
        raise ValueError("--n must be ≥ 2 (best-of-1 is the reference itself)")
    if not 0 <= ns.jeffreys_beta <= 1:
        raise ValueError("--jeffreys-beta must lie in [0, 1]")
    if ns.steps < 1 or ns.batch_prompts < 1 or ns.policy_samples < 1:
        raise ValueError("--steps, --batch-prompts and --policy-samples must be ≥ 1")
    check_run_flags(ns)
    if ns.max_new_tokens is not None and ns.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be ≥ 1")
    if ns.eval_prompts < 0:
        raise ValueError("--eval-prompts must be ≥ 0")
    check_weight_flags(ns)


def _prepare(ns: argparse.Namespace):
    """Flags, rollouts, split, model path, config: everything before training."""
    from .bond import data_stats, load_groups, split_groups
    from .bond_trainer import BondConfig

    check_flags(ns)
    manifest, groups = load_groups(ns.rollouts)
    groups = groups[:ns.limit] if ns.limit else groups
    train, held = split_groups(groups, ns.held_out, ns.seed)
    temperature = float(manifest["temperature"])
    if not temperature > 0:
        raise ValueError(f"{ns.rollouts}: rollouts drawn at temperature {temperature:g} "
                         "(greedy) have no best-of-n distribution to distil; draw them at T > 0")
    name = ns.base_model or manifest.get("extra", {}).get("model_path") or "embedded"
    model = resolve_model(name, ns.model_home)
    cfg = BondConfig(model=model, out=ns.out, reward=manifest["reward"], n=ns.bon_n,
                     jeffreys_beta=ns.jeffreys_beta, steps=ns.steps,
                     lr=ns.lr if ns.lr is not None else (1e-4 if ns.lora else 1e-5),
                     batch_prompts=ns.batch_prompts, policy_samples=ns.policy_samples,
                     max_new_tokens=ns.max_new_tokens or int(manifest["max_tokens"]),
                     temperature=temperature,  # the tempered policy π_θ,T is trained
                     max_length=ns.max_length, lora=ns.lora, lora_r=ns.lora_r,
                     lora_alpha=ns.lora_alpha, save_adapter=ns.save_adapter, seed=ns.seed,
                     eval_prompts=ns.eval_prompts)
    data = {"source": str(ns.rollouts), "reward": manifest["reward"], "k": manifest["n"],
            "train": data_stats(train, ns.bon_n), "held_out": data_stats(held, ns.bon_n)}
    return cfg, train, held, data


def _scorer(cfg):
    from runtime.scorers import ScorerRegistry, UnknownScorer, default_factories

    registry = ScorerRegistry(default_factories(cfg.length_target), None)
    try:
        return registry.load_now(cfg.reward)
    except UnknownScorer as exc:
        raise ValueError(str(exc)) from None


def _train_and_report(ns: argparse.Namespace, cfg, train, held, data) -> dict:
    from dataclasses import asdict

    from .bond_trainer import train_bond
    from .report import plot_loss

    scorer = _scorer(cfg) if cfg.jeffreys_beta > 0 else None
    result = train_bond(cfg, train, held, scorer)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    report = {"method": ns.method, "config": config, "output": str(ns.out),
              "output_kind": "LoRA adapter" if cfg.save_adapter else "merged safetensors",
              # log-probs were of logits / T (the rollouts' T): serve at T to get π_θ,T
              "serve_temperature": cfg.temperature,
              "data": data, "steps": cfg.steps, "train_s": result.train_s,
              "steps_per_s": result.steps_per_s, "trainable_params": result.trainable_params,
              "before": result.before, "after": result.after,
              "loss_curve": [list(x) for x in result.loss_curve], "log": result.log}
    ns.out.mkdir(parents=True, exist_ok=True)
    plot_loss(ns.out / "loss_curve.png", result.loss_curve, result.before, result.after,
              cfg.steps, f"{ns.method} n={cfg.n} (β_J = {cfg.jeffreys_beta:g})")
    (ns.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (ns.out / "report.md").write_text(_markdown(report))
    return report


def _markdown(report: dict) -> str:
    c, d = report["config"], report["data"]
    lines = [f"# alignserve finetune {report['method']}", "",
             f"- base model: `{c['model']}`; output `{report['output']}` ({report['output_kind']})",
             f"- rollouts: `{d['source']}` (K = {d['k']}, reward `{d['reward']}`); "
             f"best-of-{c['n']} distilled, β_J = {c['jeffreys_beta']:g}",
             f"- trained at the rollouts' temperature T = {c['temperature']:g} (log-probs of "
             f"logits / T): **serve this checkpoint at temperature {c['temperature']:g}**",
             *(f"  - {s}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in d[s].items()) for s in ("train", "held_out")
               if d.get(s)),
             f"- {report['steps']} steps, {report['steps_per_s']:.3f} steps/s, training "
             f"{report['train_s']:.1f} s, {report['trainable_params']:,} trainable parameters",
             "", "| split | forward loss before | after | best-sample log p before | after |",
             "|---|---:|---:|---:|---:|"]
    for s in report["after"]:
        b, a = report["before"][s], report["after"][s]
        lines.append(f"| {s} | {b['loss']:.3f} | {a['loss']:.3f} | {b['best_sample_logp']:.3f} "
                     f"| {a['best_sample_logp']:.3f} |")
    lines += ["", "forward loss: −Σ_k w_k·log π(y_k) over each prompt's reference samples "
              "(nats per answer).", "", "![loss curve](loss_curve.png)", ""]
    return "\n".join(lines)


def run(ns: argparse.Namespace) -> int:
    """Entry point of `finetune bond | vbon` (after parsing)."""
    try:
        prepared = _prepare(ns)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{PROG} {ns.method}: {exc}", file=sys.stderr)
        return 2
    try:
        report = _train_and_report(ns, *prepared)
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"{PROG} {ns.method}: training failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    b, a = report["before"]["train"], report["after"]["train"]
    print(f"{ns.method}: {report['steps']} steps in {report['train_s']:.1f} s; forward loss "
          f"(train) {b['loss']:.3f} → {a['loss']:.3f}, best-sample log p "
          f"{b['best_sample_logp']:.3f} → {a['best_sample_logp']:.3f}\nserve it at temperature "
          f"{report['serve_temperature']:g} (the rollouts'; it was trained as logits / T)\nwrote {ns.out} "
          f"({report['output_kind']}) and report.json, report.md, loss_curve.png")
    return 0
