"""Best-of-n serving benchmark: alignserve vs raw vLLM vs Hugging Face generate, one run.

On the dev prompts, n samples of `max_tokens` new tokens per prompt, the same reward scorer:
  (a) alignserve best_of_n over HTTP, all prompts in flight at once (a separate server process);
  (b) raw vLLM: `vllm.LLM.generate` of the same n samples per prompt (one batch) + the scorer;
  (c) Hugging Face `generate(num_return_sequences=n)` per prompt + the scorer.
Reports generated tokens, wall time, tokens/s and the ratios a/b, a/c; writes
bench/results/bon.md and bon.json. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
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
    post_chat,
    write_results,
)

from runtime.prompts import chat_prompt_ids

# ---------------------------------------------------------------- (a) alignserve over HTTP

def bench_alignserve(prompts, n, max_tokens, reward, log_dir: Path) -> dict:
    import httpx

    with alignserve_server(log_dir / "bench-server.log") as base:
        async def run() -> tuple[list[dict], float]:
            async with httpx.AsyncClient(base_url=base, timeout=1800) as c:
                async def one(p):
                    alignment = {"strategy": "best_of_n", "n": n, "reward": reward}
                    return (await post_chat(c, chat_body(p, max_tokens, alignment)))["alignment"]
                # warm-up request so that start-up effects are not measured
                await one("Hello")
                t0 = time.perf_counter()
                out = await gather_bounded(one, prompts)
                return out, time.perf_counter() - t0

        answers, wall = asyncio.run(run())
    return {"wall_s": wall, "generated_tokens": sum(a["generated_tokens"] for a in answers),
            "mean_reward": sum(a["reward"] for a in answers) / len(answers)}


# ---------------------------------------------------------------- (b) raw vLLM

def bench_vllm(model_dir: str, prompts, n, max_tokens, scorer) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", max_model_len=1024, enable_prefix_caching=True,
              seed=0)
    tok = llm.get_tokenizer()
    ids = [{"prompt_token_ids": chat_prompt_ids(tok, p)} for p in prompts]
    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0, logprobs=0)
    llm.generate([{"prompt_token_ids": chat_prompt_ids(tok, "Hello")}], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(ids, params, use_tqdm=False)
    rewards, tokens = [], 0
    for p, o in zip(prompts, outs):
        texts = [c.text for c in o.outputs]
        tokens += sum(len(c.token_ids) for c in o.outputs)
        rewards.append(max(scorer.score(p, texts)))
    wall = time.perf_counter() - t0
    del llm
    return {"wall_s": wall, "generated_tokens": tokens, "mean_reward": sum(rewards) / len(rewards)}


# ---------------------------------------------------------------- (c) Hugging Face generate

def bench_hf(model_dir: str, prompts, n, max_tokens, scorer) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    rewards, tokens = [], 0
    t0 = time.perf_counter()
    for p in tqdm(prompts, desc="hf generate", file=sys.stderr):
        inp = torch.tensor([chat_prompt_ids(tok, p)])
        with torch.inference_mode():
            out = model.generate(inp, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=max_tokens, num_return_sequences=n,
                                 pad_token_id=eos)
        new = out[:, inp.shape[1]:]
        texts = []
        for row in new.tolist():
            length = row.index(eos) + 1 if eos in row else len(row)  # count EOS like vLLM does
            tokens += length
            texts.append(tok.decode(row[:length], skip_special_tokens=True))
        rewards.append(max(scorer.score(p, texts)))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "generated_tokens": tokens, "mean_reward": sum(rewards) / len(rewards)}


# ---------------------------------------------------------------- report

def report(results: dict, args) -> str:
    a = results["alignserve"]
    cells = []
    for key, label in (("alignserve", "(a) alignserve best_of_n, HTTP, concurrent"),
                       ("vllm", "(b) raw vLLM LLM.generate + scorer"),
                       ("hf", "(c) HF generate(num_return_sequences) + scorer")):
        r = results.get(key)
        if r is None:
            continue
        tps = r["generated_tokens"] / r["wall_s"]
        r["tokens_per_s"] = tps
        wr = a["wall_s"] / r["wall_s"]
        tr = (a["generated_tokens"] / a["wall_s"]) / tps
        cells.append([label, fmt(r["wall_s"], ".1f"), r["generated_tokens"], fmt(tps, ".1f"),
                      fmt(r["mean_reward"], ".3f"), fmt(wr, ".2f"), fmt(tr, ".2f")])
    lines = [
        "# best-of-n serving benchmark\n",
        f"{len(load_prompts(args.prompts, args.limit))} prompts from {args.prompts.name}, "
        f"n = {args.n}, max_tokens = {args.max_tokens}, temperature 1.0, reward `{args.reward}`; "
        f"machine: {os.cpu_count()} CPU cores, no GPU; all three in one run.\n",
        *markdown_table(["system", "wall s", "generated tokens", "tokens/s", "mean chosen reward",
                         "wall ratio a/x", "tok/s ratio a/x"], cells),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts-dev.jsonl")
    ap.add_argument("--limit", type=int, default=None, help="Use only the first K prompts.")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reward", default="relevance")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--skip", default="", help="Comma list of systems to skip: vllm,hf")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from runtime.scorers import RelevanceScorer, default_factories
    from runtime.startup import resolve_model

    model_dir = resolve_model("embedded")
    scorer = default_factories(64)[args.reward]() if args.reward != "relevance" else RelevanceScorer()
    prompts = load_prompts(args.prompts, args.limit)
    skip = set(filter(None, args.skip.split(",")))
    results = {}
    print(">> (a) alignserve", file=sys.stderr)
    results["alignserve"] = bench_alignserve(prompts, args.n, args.max_tokens, args.reward, args.out)
    if "vllm" not in skip:
        print(">> (b) raw vLLM", file=sys.stderr)
        results["vllm"] = bench_vllm(model_dir, prompts, args.n, args.max_tokens, scorer)
    if "hf" not in skip:
        print(">> (c) HF generate", file=sys.stderr)
        results["hf"] = bench_hf(model_dir, prompts, args.n, args.max_tokens, scorer)
    md = report(results, args)  # adds tokens_per_s to each result before it is saved
    write_results(args.out, "bon", md, results)


if __name__ == "__main__":
    main()
