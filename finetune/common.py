"""What every `alignserve finetune` method shares: its program name in messages, the base
policy's resolution and the LoRA/full weight flags (a library module: the command halves import
it, never the other way round). Light: the parser imports it at every `alignserve` start; the
training helpers (torch, peft) are in finetune/utils.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROG = "alignserve finetune"


def resolve_model(name: str, home: Path | None) -> str:
    """The base policy for `from_pretrained` (runtime.startup.resolve_model: 'embedded', a
    folder or an HF id); a folder must hold a config.json."""
    from runtime.startup import resolve_model as resolve

    model = resolve(name, home)
    if Path(model).is_dir() and not (Path(model) / "config.json").is_file():
        raise ValueError(f"--model {name}: no config.json in that folder")
    return model


def add_weight_flags(p: argparse.ArgumentParser) -> None:
    """--lora | --full, --save-adapter, --lora-r, --lora-alpha: how a policy recipe trains and
    saves its weights (the preference methods and bond share them, the dests included)."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=True,
                      help="Train a LoRA adapter (default); saved merged unless --save-adapter.")
    mode.add_argument("--full", dest="lora", action="store_false", help="Full fine-tuning.")
    p.add_argument("--save-adapter", action="store_true",
                   help="Save the LoRA adapter folder instead of merged weights.")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank.")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha.")


def check_weight_flags(ns: argparse.Namespace) -> None:
    """The flag problems of `add_weight_flags` and of --out, as a ValueError."""
    if ns.lora_r < 1 or ns.lora_alpha < 1:
        raise ValueError("--lora-r and --lora-alpha must be ≥ 1")
    if ns.save_adapter and not ns.lora:
        raise ValueError("--save-adapter needs LoRA (not --full)")
    check_out(ns)


def check_run_flags(ns: argparse.Namespace, min_length: int = 16) -> None:
    """--lr (None: the recipe's default), --max-length, --held-out and --limit, as every recipe
    reads them; a ValueError naming the flag."""
    if ns.lr is not None and not ns.lr > 0:
        raise ValueError("--lr must be > 0")
    if ns.max_length < min_length:
        raise ValueError(f"--max-length must be ≥ {min_length}")
    if not 0 <= ns.held_out < 1:
        raise ValueError("--held-out must lie in [0, 1)")
    if ns.limit is not None and ns.limit < 1:
        raise ValueError("--limit must be ≥ 1")


def check_out(ns: argparse.Namespace) -> None:
    """--out is a folder or does not exist yet."""
    if ns.out.exists() and not ns.out.is_dir():
        raise ValueError(f"--out {ns.out} exists and is not a folder")
