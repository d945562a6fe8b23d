"""`alignserve rollouts`: the command's flags and entry point; the library is
valuenet/rollouts.py (engine side) and valuenet/http_rollouts.py (`--server URL`).

Module level stays light (the CLI imports it to build its parser): the runtime's engine and
scorers (vllm, torch) load inside `run`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

from runtime.prompts import load_prompts
from runtime.settings import add_engine_flags, engine_settings

from .data import Manifest
from .http_rollouts import RolloutClient, ServerError, collect_http, server_manifest
from .rollouts import RolloutConfig, RolloutError, Stats, collect, pending

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=Path, required=True,
                   help='JSONL, one {"id", "prompt", "kind"} per line.')
    p.add_argument("--n", type=int, default=8, help="Samples per prompt (K).")
    p.add_argument("--max-tokens", type=int, default=64, help="New tokens per sample.")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    p.add_argument("--reward", default="relevance", help="Reward scorer (registry name).")
    p.add_argument("--cost", default=None, help="Optional cost scorer, e.g. profanity.")
    p.add_argument("--out", type=Path, required=True, help="Rollout folder (created/resumed).")
    p.add_argument("--limit", type=int, default=None, help="Use only the first N prompts.")
    p.add_argument("--concurrency", type=int, default=16,
                   help="Prompts in flight (the engine batches their K samples together).")
    p.add_argument("--server", default=None,
                   help="Draw from a running alignserve (base URL, e.g. http://alignserve:8000) "
                   "through its API instead of starting an engine here; scorers are the "
                   "server's (remote:NAME and value:NAME included).")
    p.add_argument("--api-key", default=None, help="Bearer token for --server.")
    add_engine_flags(p, "in-process engine (without --server)")



def _check_flags(ns: argparse.Namespace) -> None:
    """Everything checkable before the (slow) engine start."""
    from runtime.scorers import default_factories

    if ns.n < 1 or ns.max_tokens < 1 or ns.concurrency < 1:
        raise ValueError("--n, --max-tokens and --concurrency must be ≥ 1")
    if ns.temperature < 0:
        raise ValueError("--temperature must be ≥ 0")
    if ns.temperature == 0 and ns.n > 1:
        log.warning("--temperature 0 makes the K samples of a prompt identical")
    if getattr(ns, "server", None):  # the server resolves the scorer names (its 400 names them)
        if ns.model is not None:
            raise ValueError("--model is the server's with --server: drop one of them")
        return
    known = default_factories(64)
    for name in filter(None, (ns.reward, ns.cost)):
        if name.startswith("remote:"):
            raise ValueError(f"scorer {name!r}: remote:NAME scorers are a server's "
                             "(--remote-scorer NAME=URL on `alignserve serve`); use --server "
                             "URL of that server, or hf:<model> to score in this process")
        if name not in known and not name.startswith("hf:"):
            raise ValueError(f"unknown scorer {name!r}; available: {', '.join(sorted(known))}, "
                             "hf:<model>")


async def _main(ns: argparse.Namespace) -> tuple[Stats, int, int]:
    from tqdm import tqdm

    from runtime.startup import model_and_name, open_runtime  # torch, vllm: only when run

    _check_flags(ns)
    prompts = load_prompts(ns.prompts, ns.limit)
    if getattr(ns, "server", None):
        return await _main_server(ns, prompts)
    # The engine samples only; make the requested reward the one build_runtime preloads.
    settings = engine_settings(ns, default_reward=ns.reward)
    model_path, model_name = model_and_name(settings)
    cfg = RolloutConfig(ns.n, ns.max_tokens, ns.temperature, ns.reward, ns.cost, ns.concurrency)
    want = Manifest(model=model_name, prompts=str(ns.prompts), n=cfg.n,
                    max_tokens=cfg.max_tokens, temperature=cfg.temperature, reward=cfg.reward,
                    cost=cfg.cost, created=datetime.now(UTC).isoformat(timespec="seconds"),
                    extra={"model_path": model_path, "top_p": 1.0,  # Sampling's default
                           "engine_seed": settings.engine_seed,
                           "dtype": settings.dtype, "chat_template": True})
    todo, manifest = pending(ns.out, prompts, want)
    if manifest is None:
        return Stats(), len(prompts), 0

    async with open_runtime(settings) as rt:
        with tqdm(total=len(todo), desc="rollouts", unit="prompt", file=sys.stderr) as bar:
            stats = await collect(rt, todo, cfg, ns.out, manifest, bar)
    return stats, len(prompts) - len(todo), len(todo)


async def _main_server(ns: argparse.Namespace, prompts: list) -> tuple[Stats, int, int]:
    """`--server`: the rollouts come through a running alignserve's API (http_rollouts.py)."""
    from tqdm import tqdm


    cfg = RolloutConfig(ns.n, ns.max_tokens, ns.temperature, ns.reward, ns.cost, ns.concurrency)
    client = RolloutClient(ns.server, ns.api_key)
    try:
        await client.start()
        want = server_manifest(client, ns.prompts, cfg,
                               datetime.now(UTC).isoformat(timespec="seconds"))
        todo, manifest = pending(ns.out, prompts, want)
        if manifest is None:
            return Stats(), len(prompts), 0
        with tqdm(total=len(todo), desc="rollouts", unit="prompt", file=sys.stderr) as bar:
            stats = await collect_http(client, todo, cfg, ns.out, manifest, bar)
    finally:
        await client.aclose()
    return stats, len(prompts) - len(todo), len(todo)


def run(ns: argparse.Namespace) -> int:
    """Entry point of the `rollouts` subcommand (after parsing)."""
    from runtime.scorers import UnknownScorer

    try:
        stats, skipped, sampled = asyncio.run(_main(ns))
    except (ValueError, FileNotFoundError, RolloutError, UnknownScorer, ServerError) as exc:
        print(f"alignserve rollouts: {exc}", file=sys.stderr)
        return 2
    if not sampled:
        print(f"{ns.out}: all {skipped} prompts already sampled; nothing to do")
        return 0
    print(f"{ns.out}: {stats.prompts} prompts × {ns.n} samples ({stats.rows} rows, "
          f"{stats.tokens} tokens) in {stats.wall_s:.1f} s = {stats.tokens_per_s:.1f} tok/s; "
          f"{skipped} prompts were already there")
    return 0
