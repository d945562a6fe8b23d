"""`alignserve train-value`: train a prefix value head (CD-FUDGE or CD-Q, Mudgal et al. 2024,
arXiv 2310.17022) on a rollout folder and write a checkpoint that `alignserve serve
--value-head NAME=PATH` serves as scorer `value:NAME`.

Imports stay light here (the parser is built for every `alignserve` command); torch and
transformers load inside `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="Rollout folder (manifest.json + rollouts.jsonl).")
    p.add_argument("--method", required=True, choices=("fudge", "cdq"),
                   help="fudge: regress every prefix on the final reward; cdq: Bellman targets "
                        "with a vocabulary-sized head (needed by tokenwise decoding).")
    p.add_argument("--steps", type=_positive(int), default=None,
                   help="Optimiser steps (default: about 8 epochs of the training rows, "
                        "20-2000). The best step on validation is saved (early stopping).")
    p.add_argument("--out", required=True, help="Checkpoint folder to write.")
    p.add_argument("--backbone", default=None,
                   help="Causal LM under the head: 'embedded', a folder or a Hugging Face id "
                        "sharing the policy's tokenizer (default: the policy, --policy).")
    p.add_argument("--policy", default="embedded",
                   help="The policy that produced the rollouts: π_ref of the CD-Q targets "
                        "(default 'embedded', the server's default model); checked against the "
                        "rollouts' manifest (a mismatch exits 2).")
    p.add_argument("--home", default=None, help="Model cache folder (default ALIGNSERVE_HOME).")
    p.add_argument("--tune", choices=("frozen", "lora"), default="frozen",
                   help="frozen: cache the backbone's hidden states once, train the head only "
                        "(default, fast on CPU); lora: also train LoRA adapters (peft).")
    p.add_argument("--batch-size", type=_positive(int), default=16, help="Rollouts per step (16).")
    p.add_argument("--lr", type=_positive(float), default=None,
                   help="Head learning rate (default: 1e-3, times sqrt(rows / 1024) below "
                        "1,024 training rows).")
    p.add_argument("--lora-lr", type=_positive(float), default=2e-4, help="LoRA learning rate.")
    p.add_argument("--lora-r", type=_positive(int), default=8, help="LoRA rank (8).")
    p.add_argument("--val-fraction", type=_fraction, default=0.2,
                   help="Share of prompts held out for validation (0.2).")
    p.add_argument("--ref-top-k", type=_positive(int), default=64,
                   help="CD-Q: top-k tokens of π_ref kept per position (64).")
    p.add_argument("--truncated", choices=("terminal", "bootstrap"), default="terminal",
                   help="CD-Q: target at the last token of a response cut by length: its reward "
                        "(terminal, default) or the bootstrapped value.")
    p.add_argument("--target", choices=("reward", "advantage"), default="reward",
                   help="What the head fits: the rollout's reward (default), or its advantage "
                        "r − (the prompt's mean rollout reward): the within-prompt part, which "
                        "is all blockwise CD, SpR and the tilt rank by.")
    p.add_argument("--seed", type=int, default=0, help="Split and batch order seed.")
    p.add_argument("--baseline", default=None, metavar="SCORER",
                   help="Also report the correlation curve of this scorer (e.g. the rollouts' "
                        "reward) applied to the validation prefixes: the baseline the head "
                        "must beat (metrics.json, correlation.png).")
    p.add_argument("--require-gain", action="store_true",
                   help="Exit 3 when no step beats the initial head (the training mean) on the "
                        "held-out prompts (default: a warning on stderr, exit 0).")
    p.add_argument("--no-progress", action="store_true", help="Hide progress bars.")


def policy_mismatch(manifest, policy: str, resolved: str) -> str | None:
    """Why `--policy` (as given, and resolved to a folder or HF id) is not the policy the
    rollouts were drawn from, or None when it is. The manifest's `extra.model_path` (what the
    engine loaded) decides; the embedded model matches itself under any ALIGNSERVE_HOME. Old
    manifests without a path are matched by name (a folder's name, an HF id)."""
    from runtime.model_prep import EMBEDDED_MODEL_NAME
    from runtime.settings import DEFAULT_MODEL

    drawn = manifest.extra.get("model_path")
    if drawn is not None:
        same = (os.path.realpath(drawn) == os.path.realpath(resolved) or drawn == resolved
                or (policy == DEFAULT_MODEL and manifest.model == EMBEDDED_MODEL_NAME))
    else:
        same = manifest.model in (policy, resolved, Path(resolved).name)
    if same:
        return None
    return (f"--policy {policy} ({resolved}) is not the policy the rollouts were drawn from "
            f"({manifest.model}, {drawn or 'no path recorded'}); V and the CD-Q targets are "
            f"values of the rollouts' policy: pass --policy {drawn or manifest.model}")


def run(ns: argparse.Namespace) -> int:
    from runtime.startup import resolve_model

    from .data import read_manifest
    from .train import TrainConfig, train

    data = Path(ns.data).expanduser()
    if not (data / "manifest.json").is_file():
        print(f"alignserve train-value: error: {data} is not a rollout folder "
              "(no manifest.json)", file=sys.stderr)
        return 2
    cfg = TrainConfig(method=ns.method, steps=ns.steps, batch_size=ns.batch_size, lr=ns.lr,
                      lora_lr=ns.lora_lr, lora_r=ns.lora_r, lora_alpha=2 * ns.lora_r,
                      tune=ns.tune, val_fraction=ns.val_fraction, ref_top_k=ns.ref_top_k,
                      truncated=ns.truncated, seed=ns.seed, progress=not ns.no_progress,
                      baseline=ns.baseline, target=ns.target)
    home = Path(ns.home).expanduser() if ns.home else None
    t0 = time.perf_counter()
    try:
        policy = resolve_model(ns.policy, home)
        mismatch = policy_mismatch(read_manifest(data), ns.policy, policy)
        if mismatch:
            print(f"alignserve train-value: error: {mismatch}", file=sys.stderr)
            return 2
        backbone = resolve_model(ns.backbone, home) if ns.backbone else policy
        metrics = train(data, Path(ns.out).expanduser(), cfg, backbone=backbone, reference=policy)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"alignserve train-value: error: {exc}", file=sys.stderr)
        return 1
    summary = {k: metrics[k] for k in ("method", "train_rows", "val_rows", "steps", "lr",
                                       "best_step", "last_step", "initial_val_loss",
                                       "val_loss", "initial_val_value_mse", "val_value_mse",
                                       "beats_initialisation", "verdict")}
    for key in ("correlation_by_prefix_length", "within_prompt_correlation_by_prefix_length",
                "baseline_correlation_by_prefix_length",
                "baseline_within_prompt_correlation_by_prefix_length"):
        if metrics.get(key):
            summary[key] = {f"{b['lo']}-{b['hi'] - 1}": b["pearson"] for b in metrics[key]}
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    summary["out"] = str(Path(ns.out).expanduser())
    print(json.dumps(summary, indent=2))
    if not metrics["beats_initialisation"]:
        # The head saved is then the initial one, a constant (the training mean): it tilts and
        # ranks nothing, so serving it is harmless but useless. Say so loudly; pipelines that
        # must not go on pass --require-gain.
        print(f"alignserve train-value: warning: {metrics['verdict']}; the saved head predicts "
              "the training mean (it changes no decoding). More rollouts, --target advantage "
              "or another --method may help.", file=sys.stderr)
        return 3 if ns.require_gain else 0
    return 0
