"""`alignserve finetune aligner`: the flags and entry point of Aligner's corrector training; the
library (triples, the SFT loop, the report) is finetune/aligner.py, which loads torch inside.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .aligner import AlignerConfig, load_triples, split_triples, train, write_report
from .common import PROG, check_out, check_run_flags, resolve_model

DEFAULT_DATA = Path(__file__).parent / "data" / "aligner_triples.jsonl"


def add_arguments(sub) -> None:
    """The `aligner` subparser of `alignserve finetune` (finetune/cli.py)."""
    p = sub.add_parser("aligner", help="Aligner (arXiv 2402.02416): SFT of a LoRA corrector on "
                       "(question, answer, correction) triples; serve it as alignment.corrector.")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Triples .jsonl: rows "
                   "{question, answer, correction} (default: the shipped synthetic triples).")
    p.add_argument("--limit", type=int, default=None, help="Use only the first N triples.")
    p.add_argument("--out", type=Path, required=True, help="Output adapter folder (+ report).")
    p.add_argument("--model", dest="base_model", default="embedded", help="Base model the "
                   "adapter is for (the served model): 'embedded', a folder or an HF id.")
    p.add_argument("--home", dest="model_home", type=Path, default=None,
                   help="Cache folder of the embedded model (default ALIGNSERVE_HOME).")
    p.add_argument("--steps", type=int, default=40, help="Optimiser steps.")
    p.add_argument("--lr", type=float, default=3e-4, help="Learning rate (AdamW).")
    p.add_argument("--batch-size", type=int, default=8, help="Triples per step.")
    p.add_argument("--max-length", type=int, default=256, help="Tokens per prompt + correction.")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (≤ the server's "
                   "--max-lora-rank).")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha.")
    p.add_argument("--held-out", type=float, default=0.2,
                   help="Share of questions kept out of training for the report, in [0, 1).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the split and the training.")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="No progress bar.")


def _check(ns) -> None:
    if ns.steps < 1 or ns.batch_size < 1 or ns.lora_r < 1 or ns.lora_alpha < 1:
        raise ValueError("--steps, --batch-size, --lora-r and --lora-alpha must be ≥ 1")
    check_run_flags(ns, min_length=32)  # a prompt, its answer and a correction
    check_out(ns)


def run(ns) -> int:
    """Exit status 0 done, 2 bad flags or data, 1 training failed (as `finetune safedpo`)."""
    try:
        _check(ns)
        triples = load_triples(ns.data, ns.limit)
        train_t, eval_t = split_triples(triples, ns.held_out, ns.seed)
        model = resolve_model(ns.base_model, ns.model_home)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{PROG} aligner: {exc}", file=sys.stderr)
        return 2
    cfg = AlignerConfig(model=model, out=ns.out, steps=ns.steps, lr=ns.lr,
                        batch_size=ns.batch_size, max_length=ns.max_length, lora_r=ns.lora_r,
                        lora_alpha=ns.lora_alpha, seed=ns.seed, progress=ns.progress)
    try:
        result = train(cfg, train_t, eval_t)
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"{PROG} aligner: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    report = {"method": "aligner", "config": {k: str(v) if isinstance(v, Path) else v
                                              for k, v in cfg.__dict__.items()},
              "output": str(ns.out), "output_kind": "LoRA adapter",
              "data": {"source": str(ns.data), "triples": len(triples), "train": len(train_t),
                       "held_out": len(eval_t)},
              "steps": ns.steps, "train_s": result.train_s,
              "trainable_params": result.trainable_params, "before": result.before,
              "after": result.after, "loss_curve": [list(x) for x in result.loss_curve]}
    write_report(ns.out, report)
    b, a = result.before["train"]["loss"], result.after["train"]["loss"]
    print(f"aligner: {ns.steps} steps in {result.train_s:.1f} s; correction NLL (train) "
          f"{b:.4f} → {a:.4f}\nwrote the LoRA adapter {ns.out} and report.json, report.md; "
          "serve it with --enable-lora true, POST /admin/policies {name, path}, then "
          '"alignment": {"strategy": "aligner", "corrector": NAME}')
    return 0
