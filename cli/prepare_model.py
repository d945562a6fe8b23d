"""`alignserve prepare-model`: convert the embedded SmolLM2 GGUF to safetensors under the cache
folder (runtime/model_prep.py), so `serve` and the offline tools start without a download."""

from __future__ import annotations

import argparse

from runtime.model_prep import prepare_embedded_model
from runtime.settings import EngineSettings

HELP = "Convert the embedded SmolLM2 GGUF to safetensors."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=None, help="Cache folder (default ALIGNSERVE_HOME).")
    parser.add_argument("--force", action="store_true", help="Convert again even if present.")


def run(ns: argparse.Namespace) -> int:
    home = EngineSettings(home=ns.home).home if ns.home else EngineSettings().home
    print(prepare_embedded_model(home, force=ns.force))
    return 0
