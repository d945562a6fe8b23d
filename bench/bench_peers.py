"""alignserve against its peers, side by side in one run (issue 27): vLLM's own OpenAI server on
plain traffic, and its_hub's best-of-n driving that server.

One engine at a time, same model (the embedded SmolLM2 folder) and the same engine settings on
both servers (the report's header lists them):
  1. `python -m vllm.entrypoints.openai.api_server` up → plain rows → its_hub rows → down;
  2. `alignserve serve` up → plain rows → best-of-n and speculative-rejection rows → down.
Plain rows: chat completions without `alignment` from the dev prompts, max_tokens 64,
temperature 1, a fixed `seed` per request (the same bodies to both servers), at each
--concurrency, streamed and not: completion tokens/s over the row's wall, requests/s, p50/p99
time to the first content delta (streamed), inter-token latency (gaps between content deltas,
pooled over the row), time per output token after the first, and request latency. Peer rows:
--peer-prompts prompts, 8 in flight, 64 tokens, temperature 1, reward `relevance`: its_hub's
`BestOfN(orm).ainfer(lm, prompt, budget=N)` (the ORM wraps the project's relevance scorer, in
this process) against alignserve best_of_n at the same N, and alignserve speculative_rejection
with its defaults at the largest N. Every chosen answer is scored again here with the same
scorer once the servers are down. Writes peers.md, peers.json and peers.png under --out (after
every row, so a cut run keeps its rows).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np
from common import (
    ROOT,
    alignserve_server,
    chat_body,
    curve,
    figure,
    fmt,
    free_port,
    gather_bounded,
    load_prompts,
    load_range,
    markdown_table,
    post_chat,
    server_process,
    stream_chat,
    write_results,
)

from runtime.model_prep import EMBEDDED_MODEL_NAME, embedded_model_dir
from runtime.settings import EngineSettings

MAX_MODEL_LEN, KV_GIB = 1024, 2  # what common.alignserve_server starts every server with
SEED_BASE = 1000  # request i of a plain row: seed SEED_BASE + i, on both servers
THROUGHPUT_TARGET, TTFT_TARGET, BON_TARGET, SPR_TARGET = 0.95, 1.10, 1.0, 0.5


def engine_settings(args) -> dict:
    """The engine settings both servers get, as vLLM names them (runtime/engine.py builds
    AsyncEngineArgs from the same values; `block_size` 32 is its CPU default, CPU_BLOCK_SIZE)."""
    return {"dtype": args.dtype, "max_model_len": MAX_MODEL_LEN, "kv_cache_gib": KV_GIB,
            "block_size": args.block_size, "enable_prefix_caching": True, "seed": 0,
            "gpu_memory_utilization": 0.85,
            "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
            "enforce_eager": args.enforce_eager, "logprobs_mode": "processed_logprobs",
            "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True}}


def vllm_command(s: dict, model_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
            "--port", str(port), "--model", str(model_dir), "--served-model-name",
            EMBEDDED_MODEL_NAME, "--dtype", s["dtype"], "--max-model-len", str(s["max_model_len"]),
            "--block-size", str(s["block_size"]), "--enable-prefix-caching", "--seed", str(s["seed"]),
            "--gpu-memory-utilization", str(s["gpu_memory_utilization"]),
            "--max-num-seqs", str(s["max_num_seqs"]),
            "--max-num-batched-tokens", str(s["max_num_batched_tokens"]),
            "--logprobs-mode", s["logprobs_mode"],
            "--structured-outputs-config", json.dumps(s["structured_outputs_config"]),
            *(["--enforce-eager"] if s["enforce_eager"] else [])]


def alignserve_flags(s: dict) -> list[str]:
    """alignserve always enables prefix caching and sets logprobs_mode / structured outputs
    itself (runtime/engine.py); the rest by flag."""
    return ["--dtype", s["dtype"], "--block-size", str(s["block_size"]), "--engine-seed",
            str(s["seed"]), "--max-num-seqs", str(s["max_num_seqs"]), "--max-num-batched-tokens",
            str(s["max_num_batched_tokens"]), "--enforce-eager", str(s["enforce_eager"]).lower(),
            "--gpu-memory-utilization", str(s["gpu_memory_utilization"])]


def vllm_server(log_path: Path, settings: dict, model_dir: Path):
    """vLLM's own OpenAI server on a free port (its base URL) once /v1/models answers; always
    stopped afterwards, its whole process group (common.server_process)."""
    port = free_port()  # VLLM_CPU_KVCACHE_SPACE: set by `run`
    return server_process(vllm_command(settings, model_dir, port), port, "/v1/models", log_path)


# ---------------------------------------------------------------- pure: statistics, ratios

def pct(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, numpy's default); None without values."""
    return float(np.percentile(values, q)) if len(values) else None


def plain_stats(samples: Sequence[dict], wall: float) -> dict:
    """A plain row's numbers from its requests: `total_s`, `tokens` (completion tokens) and,
    streamed, `deltas_s` (arrival of each content delta since the request was sent)."""
    tokens = sum(s["tokens"] for s in samples)
    ttft = [s["deltas_s"][0] for s in samples if s.get("deltas_s")]
    itl = [b - a for s in samples for a, b in zip(s.get("deltas_s") or [], (s.get("deltas_s") or [])[1:])]
    total = [s["total_s"] for s in samples]
    # per output token after the first, whatever the server packs into one delta
    tpot = [(s["total_s"] - s["deltas_s"][0]) / (s["tokens"] - 1) for s in samples
            if s.get("deltas_s") and s["tokens"] > 1]
    return {"requests": len(samples), "wall_s": wall, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall, "requests_per_s": len(samples) / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
            "latency_p50_s": pct(total, 50), "latency_p99_s": pct(total, 99)}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def plain_ratios(rows: Sequence[dict]) -> list[dict]:
    """alignserve / vLLM per (streamed, concurrency) where both rows exist, and the targets:
    throughput ≥ 0.95×, p50 TTFT ≤ 1.10× (streamed rows only)."""
    plain = {(r["server"], r["stream"], r["concurrency"]): r for r in rows if r["kind"] == "plain"}
    out = []
    for (server, stream, conc), a in sorted(plain.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        v = plain.get(("vllm", stream, conc))
        if server != "alignserve" or v is None:
            continue
        r = {"stream": stream, "concurrency": conc,
             **{f"{k}_ratio": ratio(a[k], v[k]) for k in
                ("tokens_per_s", "requests_per_s", "ttft_p50_s", "itl_p50_s", "tpot_p50_s",
                 "latency_p50_s")}}
        r["throughput_met"] = r["tokens_per_s_ratio"] >= THROUGHPUT_TARGET
        r["ttft_met"] = (None if r["ttft_p50_s_ratio"] is None
                         else r["ttft_p50_s_ratio"] <= TTFT_TARGET)
        out.append(r)
    return out


def peer_ratios(rows: Sequence[dict]) -> list[dict]:
    """alignserve best-of-n / its_hub best-of-n at equal N (target wall ≤ 1.0×), and
    alignserve's SpR (defaults) / its_hub's best-of-n at the largest N its_hub ran (target
    wall ≤ 0.5× at a mean reward at least its_hub's)."""
    peers = [r for r in rows if r["kind"] == "peer"]
    its = {r["n"]: r for r in peers if r["system"] == "its_hub"}
    out = []
    for r in peers:
        if r["system"] != "alignserve":
            continue
        ref_n = r["n"] if r["method"] == "best_of_n" else max(its, default=None)
        ref = its.get(ref_n) if ref_n is not None else None
        if ref is None:
            continue
        target = BON_TARGET if r["method"] == "best_of_n" else SPR_TARGET
        wall = r["wall_s"] / ref["wall_s"]
        reward_diff = (None if r.get("mean_reward") is None or ref.get("mean_reward") is None
                       else r["mean_reward"] - ref["mean_reward"])
        met = wall <= target and (r["method"] == "best_of_n"
                                  or (reward_diff is not None and reward_diff >= 0))
        out.append({"label": f"{r['label']} / its_hub best_of_n N={ref_n}", "wall_ratio": wall,
                    "token_ratio": ratio(r["generated_tokens"], ref["generated_tokens"]),
                    "reward_diff": reward_diff, "target": target, "met": met})
    return out


# ---------------------------------------------------------------- plain traffic

async def timed_stream(client, body: dict) -> dict:
    """A streamed chat completion: the arrival time of every content delta and the usage."""
    out = await stream_chat(client, {**body, "stream_options": {"include_usage": True}})
    usage = out["usage"]
    return {"total_s": out["total_s"], "deltas_s": out["deltas_s"],
            "tokens": usage["completion_tokens"] if usage else len(out["deltas_s"])}


async def timed_post(client, body: dict) -> dict:
    t0 = time.perf_counter()
    out = await post_chat(client, body)
    return {"total_s": time.perf_counter() - t0, "tokens": out["usage"]["completion_tokens"]}


def plain_bodies(prompts: Sequence[str], count: int, args) -> list[dict]:
    """`count` requests cycling through the prompts, request i seeded SEED_BASE + i."""
    seed = (lambda i: {}) if args.no_seed else (lambda i: {"seed": SEED_BASE + i})
    return [chat_body(prompts[i % len(prompts)], args.max_tokens, model=EMBEDDED_MODEL_NAME,
                      **seed(i)) for i in range(count)]


async def plain_rows(base: str, server: str, prompts, args, rows: list[dict], bar) -> None:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, timeout=3600, limits=limits) as client:
        warm = plain_bodies(prompts, 4, args)  # compile paths and caches, not measured
        await gather_bounded(lambda b: timed_post(client, b), warm, 4)
        await gather_bounded(lambda b: timed_stream(client, b), warm, 4)
        for conc in args.concurrency:
            for stream in (False, True):
                bar.set_postfix_str(f"{server} c={conc} {'stream' if stream else 'plain'}")
                count = args.requests_per_row or max(2 * conc, 16)
                send = timed_stream if stream else timed_post
                load0, t0 = os.getloadavg()[0], time.perf_counter()
                samples = await gather_bounded(lambda b, f=send: f(client, b),
                                               plain_bodies(prompts, count, args), conc)
                wall = time.perf_counter() - t0
                rows.append({"kind": "plain", "server": server, "stream": stream,
                             "concurrency": conc, **plain_stats(samples, wall),
                             "load_avg": [load0, os.getloadavg()[0]]})
                save(rows, args)
                bar.update()


# ---------------------------------------------------------------- best-of-n: its_hub and alignserve

def relevance_orm(scorer, executor: ThreadPoolExecutor):
    """its_hub's outcome reward model over the project's relevance scorer: the last user
    message against the last assistant message (the server scores chat requests so too:
    server/serving/endpoints.py), scored in `executor` so the event loop keeps sending."""
    from its_hub.api import AbstractOutcomeRewardModel

    def last(conv, role: str) -> str:  # conv: its_hub ChatMessages, as BestOfN passes them
        return next(m.extract_text_content() for m in reversed(conv) if m.role == role)

    class RelevanceORM(AbstractOutcomeRewardModel):
        def score(self, messages, **kwargs):
            single = not isinstance(messages[0], list)
            convs = [messages] if single else messages
            pairs = [(last(c, "user"), last(c, "assistant")) for c in convs]
            scores = scorer.score_pairs(pairs)
            return scores[0] if single else scores

        async def ascore(self, messages, orchestrator=None, **kwargs):
            return await asyncio.get_running_loop().run_in_executor(executor, self.score, messages)

    return RelevanceORM()


async def its_hub_rows(base: str, prompts: list[str], args, scorer, rows: list[dict], bar) -> None:
    from its_hub import BestOfN, OpenAICompatibleLanguageModel
    from its_hub.core.orchestrator import LMOrchestrator

    lm = OpenAICompatibleLanguageModel(endpoint=f"{base}/v1", api_key="none",
                                       model_name=EMBEDDED_MODEL_NAME,
                                       max_completion_tokens=args.max_tokens, temperature=1.0)
    with ThreadPoolExecutor(2, thread_name_prefix="orm") as pool:  # the server's scorer_threads
        bon = BestOfN(relevance_orm(scorer, pool), LMOrchestrator(args.its_hub_concurrency))
        try:
            await bon.ainfer(lm, prompts[0], budget=2)  # warm-up: session, scorer
            for n in args.ns:
                bar.set_postfix_str(f"its_hub best_of_n N={n}")

                async def one(prompt: str, n: int = n) -> tuple[str, int, float]:
                    res = await bon.ainfer(lm, prompt, budget=n, return_response_only=False)
                    tokens = res.usage.completion_tokens if res.usage else None
                    return res.the_one.get("content") or "", tokens, res.scores[res.selected_index]

                load0, t0 = os.getloadavg()[0], time.perf_counter()
                out = await gather_bounded(one, prompts, args.in_flight)
                rows.append(peer_row("its_hub", "best_of_n", n, f"its_hub best_of_n N={n}",
                                     prompts, out, time.perf_counter() - t0, args, load0))
                save(rows, args)
                bar.update()
        finally:
            await lm.close()


def peer_row(system: str, method: str, n: int, label: str, prompts: list[str],
             out: Sequence[tuple[str, int | None, float | None]], wall: float, args,
             load0: float) -> dict:
    """One best-of-n / SpR row from (answer, generated tokens, own reward) per prompt."""
    tokens = [t for _, t, _ in out]
    own = [r for *_, r in out if r is not None]
    return {"kind": "peer", "system": system, "method": method, "n": n, "label": label,
            "prompts": len(prompts), "in_flight": args.in_flight, "wall_s": wall,
            "generated_tokens": None if None in tokens else sum(t or 0 for t in tokens),
            "own_mean_reward": float(np.mean(own)) if own else None,
            "prompt_texts": list(prompts), "answers": [a for a, _, _ in out],
            "load_avg": [load0, os.getloadavg()[0]]}


def alignserve_peer_settings(args) -> list[tuple[str, str, int, dict]]:
    """(label, method, N, alignment) of alignserve's rows: best-of-n at every N, then
    speculative rejection with its defaults at the largest N."""
    rows = [(f"alignserve best_of_n N={n}", "best_of_n", n,
             {"strategy": "best_of_n", "n": n, "reward": "relevance"}) for n in args.ns]
    n = max(args.ns)
    return rows + [(f"alignserve SpR (defaults) N={n}", "speculative_rejection", n,
                    {"strategy": "speculative_rejection", "n": n, "reward": "relevance"})]


async def alignserve_peer_rows(base: str, prompts: list[str], args, rows: list[dict], bar) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        async def one(prompt: str, alignment: dict) -> tuple[str, int, float]:
            out = await post_chat(client, chat_body(prompt, args.max_tokens, alignment,
                                                    model=EMBEDDED_MODEL_NAME))
            al = out["alignment"]
            return out["choices"][0]["message"]["content"] or "", al["generated_tokens"], al["reward"]

        await one(prompts[0], {"strategy": "best_of_n", "n": 2, "reward": "relevance"})
        for label, method, n, alignment in alignserve_peer_settings(args):
            bar.set_postfix_str(label)
            load0, t0 = os.getloadavg()[0], time.perf_counter()
            out = await gather_bounded(lambda p, al=alignment: one(p, al), prompts, args.in_flight)
            rows.append(peer_row("alignserve", method, n, label, prompts, out,
                                 time.perf_counter() - t0, args, load0))
            save(rows, args)
            bar.update()


def rescore(rows: list[dict], scorer) -> None:
    """Every chosen answer scored again with the same relevance scorer, in this process."""
    for r in rows:
        if r["kind"] == "peer" and "mean_reward" not in r:
            scores = scorer.score_pairs(list(zip(r["prompt_texts"], r["answers"])))
            r["rewards"], r["mean_reward"] = scores, float(np.mean(scores))


# ---------------------------------------------------------------- report, figure

def version(*dists: str) -> str:
    """The first of `dists` installed, its version ('?' for none)."""
    for dist in dists:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return "?"


def machine() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "?")
    return f"{platform.node()}, {os.cpu_count()} cores ({cpu}), no GPU used"


def header(rows: Sequence[dict], args) -> list[str]:
    s = args.settings
    return [
        "# alignserve against its peers: vLLM's OpenAI server, its_hub\n",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {machine()}; "
        f"vLLM {version('vllm-cpu', 'vllm')}, "
        f"its_hub {version('its-hub')}; model {EMBEDDED_MODEL_NAME} (the embedded folder); one "
        "engine at a time, one run. 1-minute load average "
        f"{load_range(rows)} over the rows (per row in peers.json).\n",
        "Engine settings, the same on both servers: " + ", ".join(
            f"{k} {json.dumps(v) if isinstance(v, dict) else v}" for k, v in s.items())
        + " (vLLM: flags and VLLM_CPU_KVCACHE_SPACE; alignserve: flags, prefix caching, "
        "logprobs_mode and structured outputs set by runtime/engine.py).\n",
        f"Plain rows: dev prompts, max_tokens {args.max_tokens}, temperature 1, "
        + ("no seed" if args.no_seed else f"request i seeded {SEED_BASE} + i on both servers")
        + f"; requests per row: {args.requests_per_row or 'max(2 × concurrency, 16)'}. TTFT: "
        "first content delta; ITL: gaps between content deltas, pooled over the row; TPOT: "
        "(latency − TTFT) / (tokens − 1) per request; tokens/s: "
        "completion tokens (usage) over the row's wall.\n",
        *(f"**Not measured:** {e}\n" for e in args.errors),
    ]


def plain_section(rows: Sequence[dict]) -> list[str]:
    ms = lambda v: fmt(None if v is None else 1000 * v, ".0f")  # noqa: E731
    table = markdown_table(
        ["server", "streamed", "in flight", "requests", "wall s", "tokens", "tokens/s", "req/s",
         "TTFT p50 / p99 ms", "ITL p50 / p99 ms", "TPOT p50 / p99 ms", "latency p50 / p99 s",
         "load"],
        [[r["server"], "yes" if r["stream"] else "no", r["concurrency"], r["requests"],
          fmt(r["wall_s"], ".1f"), r["completion_tokens"], fmt(r["tokens_per_s"], ".1f"),
          fmt(r["requests_per_s"], ".2f"), f"{ms(r['ttft_p50_s'])} / {ms(r['ttft_p99_s'])}",
          f"{ms(r['itl_p50_s'])} / {ms(r['itl_p99_s'])}",
          f"{ms(r['tpot_p50_s'])} / {ms(r['tpot_p99_s'])}",
          f"{fmt(r['latency_p50_s'], '.2f')} / {fmt(r['latency_p99_s'], '.2f')}",
          f"{r['load_avg'][0]:.1f}–{r['load_avg'][1]:.1f}"]
         for r in rows if r["kind"] == "plain"])
    ok = lambda m: "–" if m is None else ("yes" if m else "**no**")  # noqa: E731
    ratios = markdown_table(
        ["streamed", "in flight", "tokens/s ratio (≥ 0.95)", "req/s ratio",
         "TTFT p50 ratio (≤ 1.10)", "ITL p50 ratio", "TPOT p50 ratio", "latency p50 ratio",
         "throughput met",
         "TTFT met"],
        [["yes" if r["stream"] else "no", r["concurrency"], fmt(r["tokens_per_s_ratio"], ".3f"),
          fmt(r["requests_per_s_ratio"], ".3f"), fmt(r["ttft_p50_s_ratio"], ".3f"),
          fmt(r["itl_p50_s_ratio"], ".3f"), fmt(r["tpot_p50_s_ratio"], ".3f"),
          fmt(r["latency_p50_s_ratio"], ".3f"),
          ok(r["throughput_met"]), ok(r["ttft_met"])] for r in plain_ratios(rows)])
    return ["## Plain traffic: alignserve vs vLLM's OpenAI server\n", *table, "",
            "### alignserve / vLLM\n", *ratios, ""]


def peer_section(rows: Sequence[dict], args) -> list[str]:
    table = markdown_table(
        ["setting", "prompts", "in flight", "wall s", "generated tokens", "mean chosen reward",
         "own reward (ORM / API)", "load"],
        [[r["label"], r["prompts"], r["in_flight"], fmt(r["wall_s"], ".1f"),
          fmt(r["generated_tokens"]), fmt(r.get("mean_reward"), ".4f"),
          fmt(r["own_mean_reward"], ".4f"), f"{r['load_avg'][0]:.1f}–{r['load_avg'][1]:.1f}"]
         for r in rows if r["kind"] == "peer"])
    ratios = markdown_table(
        ["comparison", "wall ratio", "target", "token ratio", "reward − its_hub", "met"],
        [[p["label"], fmt(p["wall_ratio"], ".3f"), f"≤ {p['target']}",
          fmt(p["token_ratio"], ".3f"), fmt(p["reward_diff"], "+.4f"),
          "yes" if p["met"] else "**no**"] for p in peer_ratios(rows)])
    return ["## Best-of-n against its_hub\n",
            f"its_hub `BestOfN(orm).ainfer(lm, prompt, budget=N)` with "
            f"`OpenAICompatibleLanguageModel` on vLLM's server, `LMOrchestrator(max_concurrency="
            f"{args.its_hub_concurrency})` (aiohttp's default of 100 connections per session "
            "still applies); the ORM is the project's `relevance` scorer in the bench process. "
            f"alignserve: `best_of_n` and `speculative_rejection` (defaults), reward `relevance`. "
            f"{args.peer_prompts} dev prompts, {args.in_flight} in flight, max_tokens "
            f"{args.max_tokens}, temperature 1, no seed. Mean chosen reward: every chosen answer "
            "scored again with the same scorer after the servers stopped; own reward: its_hub's "
            "ORM score / alignserve's `alignment.reward` of the chosen answer. its_hub tokens: "
            "the usage of its N requests.\n", *table, "", *ratios, ""]


def report(rows: Sequence[dict], args) -> str:
    lines = header(rows, args) + [""] + plain_section(rows) + peer_section(rows, args)
    return "\n".join(lines + ["![throughput and TTFT](peers.png)", ""])


def plot(rows: Sequence[dict], path: Path) -> None:
    plain = [r for r in rows if r["kind"] == "plain"]
    with figure(path, ncols=2, size=(12, 4.5)) as (ax, ax2):
        for color, server in (("C0", "vllm"), ("C1", "alignserve")):  # one colour per server
            for stream in (False, True):
                pts = [r for r in plain if r["server"] == server and r["stream"] == stream]
                if pts:
                    curve(ax, pts, "concurrency", "tokens_per_s",
                          f"{server}, {'streamed' if stream else 'not streamed'}",
                          color + ("o-" if stream else "s--"))
            pts = [{**r, "ttft_ms": 1000 * r["ttft_p50_s"]} for r in plain
                   if r["server"] == server and r["stream"] and r["ttft_p50_s"] is not None]
            if pts:
                curve(ax2, pts, "concurrency", "ttft_ms", server, color + "o-")
        ticks = sorted({r["concurrency"] for r in plain})
        for a in (ax, ax2):
            a.set_xscale("log", base=2)
            a.set_xticks(ticks, [str(t) for t in ticks])
            a.set_xlabel("requests in flight")
        ax.set_ylabel("completion tokens/s")
        ax.set_title("Plain traffic throughput")
        ax2.set_ylabel("p50 time to first token, ms")
        ax2.set_title("p50 TTFT (streamed)")


def save(rows: list[dict], args, final: bool = False) -> None:
    """peers.md, .json and .png so far; the report on stdout only at the end (tqdm's bar
    is on stderr meanwhile)."""
    md = report(rows, args)
    data = {"settings": args.settings, "errors": args.errors,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if k not in ("settings", "errors")},
            "rows": rows, "plain_ratios": plain_ratios(rows), "peer_ratios": peer_ratios(rows)}
    if final:
        write_results(args.out, "peers", md, data)
    else:
        (args.out / "peers.md").write_text(md)
        (args.out / "peers.json").write_text(json.dumps(data, indent=2) + "\n")
    if any(r["kind"] == "plain" for r in rows):
        plot(rows, args.out / "peers.png")


# ---------------------------------------------------------------- the run

def run(args) -> list[dict]:
    from tqdm import tqdm

    from runtime.scorers import RelevanceScorer

    try:
        import its_hub  # noqa: F401  (checked before any engine starts)
    except ImportError:
        raise SystemExit("its_hub is not installed: pip install -e '.[peers]'") from None
    # both servers read the KV cache size from here (alignserve only sets it when unset)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{args.settings['kv_cache_gib']:g}"
    model_dir = embedded_model_dir(EngineSettings().home)
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"{model_dir} is not prepared: run `make model` first")
    prompts = load_prompts(args.prompts)
    peer_prompts = load_prompts(args.prompts, args.peer_prompts, mixed=True)
    scorer = RelevanceScorer(device="cpu")  # loaded before any engine, for its_hub's ORM
    scorer.score(peer_prompts[0], ["warm-up"])
    rows: list[dict] = []
    total = 4 * len(args.concurrency) + 2 * len(args.ns) + 1
    with tqdm(total=total, desc="rows", file=sys.stderr) as bar:
        with vllm_server(args.out / "peers-vllm.log", args.settings, model_dir) as base:
            asyncio.run(plain_rows(base, "vllm", prompts, args, rows, bar))
            try:  # a failure of the peer library keeps alignserve's rows; the report says so
                asyncio.run(its_hub_rows(base, peer_prompts, args, scorer, rows, bar))
            except Exception as exc:
                traceback.print_exc()
                args.errors.append(f"its_hub rows failed: {exc!r} (traceback on stderr)")
        flags = alignserve_flags(args.settings)
        with alignserve_server(args.out / "peers-alignserve.log", *flags) as base:
            asyncio.run(plain_rows(base, "alignserve", prompts, args, rows, bar))
            asyncio.run(alignserve_peer_rows(base, peer_prompts, args, rows, bar))
    rescore(rows, scorer)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--requests-per-row", type=int, help="Default max(2 × concurrency, 16).")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-seed", action="store_true", help="Plain requests without `seed`.")
    ap.add_argument("--peer-prompts", type=int, default=16)
    ap.add_argument("--ns", type=int, nargs="+", default=[8, 32], help="Best-of-n N values.")
    ap.add_argument("--in-flight", type=int, default=8, help="Prompts in flight, peer rows.")
    ap.add_argument("--its-hub-concurrency", type=int, default=-1,
                    help="its_hub LMOrchestrator max_concurrency (-1: no client-side cap).")
    ap.add_argument("--quick", action="store_true",
                    help="Concurrency 1 and 8, 8 peer prompts, N = 8 only.")
    ap.add_argument("--dtype", default="float32", help="Both servers (alignserve's CPU 'auto').")
    ap.add_argument("--block-size", type=int, default=32, help="alignserve's CPU default.")
    ap.add_argument("--max-num-seqs", type=int, default=128,
                    help="vLLM's CPU default (both servers get it explicitly).")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="vLLM's CPU default (both servers get it explicitly).")
    ap.add_argument("--enforce-eager", action="store_true", help="Both servers without "
                    "torch.compile (faster start, slower steps; off is alignserve's default).")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.peer_prompts, args.ns = [1, 8], 8, [8]
    args.settings, args.errors = engine_settings(args), []
    args.out.mkdir(parents=True, exist_ok=True)
    save(run(args), args, final=True)


if __name__ == "__main__":
    main()
