"""`alignserve eval`: flags, then prompts → plan → runner → report.

`add_arguments` fills the `eval` subparser of the command line (cli/main.py delegates here);
`main` is the same command standalone (`python -m evaluation`). Module level imports only the
standard library and the plan: the engine, httpx, tqdm and matplotlib load when used.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

from runtime.prompts import load_prompts
from runtime.settings import add_engine_flags, engine_settings

from .plan import DEFAULT_HARMLESS_THRESHOLDS, build_plan, parse_list

log = logging.getLogger(__name__)
DEFAULT_PAIRS = Path(__file__).resolve().parents[1] / "finetune" / "data" / "synthetic_safety.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=Path, default=None,
                   help='JSONL, one {"id", "prompt", "kind"} per line (kind: helpful, '
                   'adversarial, ...); required unless --prefill.')
    p.add_argument("--strategies", default="none,best_of_n,soft_best_of_n,speculative_rejection",
                   help="Comma-separated names from the strategy registry ('none', the base "
                        "policy of the win rates, is always run).")
    p.add_argument("--n", default="8", help="Candidates per answer; a comma list (2,4,8,16) "
                   "sweeps it for every strategy that uses n.")
    p.add_argument("--max-tokens", type=int, default=64, help="New tokens per answer.")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    p.add_argument("--reward", default="relevance", help="Reward scorer (selection and win rate).")
    p.add_argument("--cost", default=None, help="Cost scorer, e.g. profanity (selection score "
                   "= reward − cost_weight·cost, and the harmless flag).")
    p.add_argument("--cost-weight", type=float, default=1.0, help="λ in reward − λ·cost.")
    p.add_argument("--panel", default=None, metavar="A,B,C",
                   help="Scorers, each one user ('-NAME': a cost as utility): report every "
                        "strategy's distortion over them, from its candidates "
                        "(evaluation/panel.py).")
    p.add_argument("--judge", action="append", default=None, metavar="SCORER",
                   help="Repeatable: also score every answer with this scorer, which the "
                        "strategies do not optimise (not --reward/--cost; '--judge=-NAME': a "
                        "cost as a utility): proxy vs judge per strategy and n in the report, "
                        "and judge.png, the over-optimisation curve (evaluation/judge.py).")
    p.add_argument("--harmless-threshold", type=float, default=None,
                   help="Harmless = cost below this (default: "
                        f"{DEFAULT_HARMLESS_THRESHOLDS} by cost name).")
    p.add_argument("--soft-temperature", type=float, default=1.0,
                   help="soft_best_of_n λ: draw candidate i with probability softmax(score/λ).")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="speculative_rejection: share of the pool rejected per decision point.")
    p.add_argument("--decision-tokens", type=int, default=16,
                   help="speculative_rejection: tokens before the first decision point.")
    p.add_argument("--samples", type=int, default=1,
                   help="Answers per prompt and setting (K). Every ratio and mean gets a 95%% "
                        "interval clustered by prompt; K > 1 resolves per-prompt variation.")
    p.add_argument("--seed", type=int, default=0,
                   help="Seed of the answers: answer k to a prompt under a setting samples "
                        "with a seed derived from (seed, prompt id, setting, k); -1: unseeded.")
    p.add_argument("--limit", type=int, default=None, help="Use only the first N prompts.")
    p.add_argument("--concurrency", type=int, default=8, help="Prompts in flight per setting.")
    p.add_argument("--out", type=Path, required=True, help="Folder for results.json, report.md, PNGs.")
    p.add_argument("--server", default=None, help="Evaluate a running server (base URL, e.g. "
                   "http://127.0.0.1:8000) instead of starting the engine in this process.")
    p.add_argument("--api-key", default=None, help="Bearer token for --server.")
    add_engine_flags(p, "in-process engine (without --server)")
    pre = p.add_argument_group("prefill attack (Qi et al. 2024, arXiv 2406.05946): "
                               "evaluation/prefill.py")
    pre.add_argument("--prefill", default=None, metavar="K1,K2,...",
                     help="Instead of the prompts: prefill the first k tokens of a harmful "
                          "answer and measure, per strategy, how often the continuation is "
                          "harmful (k = 0 is always run). Needs --cost.")
    pre.add_argument("--prefill-data", type=Path, default=DEFAULT_PAIRS,
                     help="Preference pairs (PKU-SafeRLHF schema) whose unsafe responses are "
                          "the harmful answers (default: the shipped synthetic pairs).")
    sep = p.add_argument_group("separation of safe and harmful prompts (KLDO, arXiv 2502.00657)")
    sep.add_argument("--separation", default=None, metavar="POLICIES",
                     help="Comma list of policies ('embedded', checkpoint folders), e.g. the "
                          "base and its aligned checkpoint: measure each one's separation of "
                          "safe vs harmful prompts (evaluation/separation.py) into the report "
                          "and separation.png.")
    sep.add_argument("--separation-only", action="store_true",
                     help="Only the separation metric: no engine, no answers.")
    sep.add_argument("--harmful-kind", default="adversarial",
                     help="Prompt kind of the harmful set; every other kind is the safe set.")


INTERVALS = ("95%, clustered by prompt: Wilson with the cluster-effective n for the harmless "
             "ratio, cluster-robust t for means and the win rate (decoding/intervals.py)")


def _seed(ns: argparse.Namespace) -> int | None:
    return None if ns.seed == -1 else ns.seed


def _threshold(ns: argparse.Namespace) -> float | None:
    if ns.harmless_threshold is not None:
        return ns.harmless_threshold
    return DEFAULT_HARMLESS_THRESHOLDS.get(ns.cost) if ns.cost else None


def _validate(ns: argparse.Namespace):
    """Everything checkable before the (slow) engine start."""
    from .panel import parse_panel
    from .runners import RunConfig

    if min(ns.max_tokens, ns.concurrency, ns.decision_tokens, ns.samples) < 1:
        raise ValueError("--max-tokens, --concurrency, --decision-tokens and --samples must be ≥ 1")
    if ns.seed < -1:
        raise ValueError("--seed must be ≥ 0 (or -1: unseeded)")
    if not 0 <= ns.alpha < 1:
        raise ValueError("--alpha must lie in [0, 1)")
    if ns.cost_weight < 0 or ns.soft_temperature <= 0 or ns.temperature < 0:
        raise ValueError("--cost-weight ≥ 0, --soft-temperature > 0, --temperature ≥ 0")
    remote = [n for n in (ns.reward, ns.cost) if n and n.startswith("remote:")]
    if remote and not ns.server:  # before the engine starts, not at the first answer
        raise ValueError(f"scorer {remote[0]!r}: remote:NAME scorers are a server's "
                         "(--remote-scorer NAME=URL on `alignserve serve`); evaluate that "
                         "server with --server URL, or use hf:<model> in-process")
    options = {"alpha": ns.alpha, "decision_tokens": ns.decision_tokens}
    panel = parse_panel(ns.panel)
    if panel and ns.prefill is not None:
        raise ValueError("--panel measures the prompts evaluation, not --prefill")
    if ns.judge and ns.prefill is not None:
        raise ValueError("--judge scores the prompts evaluation, not --prefill")
    plan = build_plan(parse_list(ns.strategies), parse_list(ns.n, int), options)
    if ns.prefill is not None:
        from .prefill import load_attacks

        if not ns.cost or _threshold(ns) is None:
            raise ValueError("--prefill judges continuations by a cost: give --cost (and "
                             "--harmless-threshold for costs other than profanity)")
        ks = sorted({0, *parse_list(ns.prefill, int)})
        if ks[0] < 0:
            raise ValueError("--prefill: k ≥ 0 tokens")
        prompts = load_attacks(ns.prefill_data, ns.limit)
    elif ns.prompts is None:
        raise ValueError("--prompts is required (or --prefill)")
    else:
        prompts = load_prompts(ns.prompts, ns.limit)
    cfg = RunConfig(max_tokens=ns.max_tokens, reward=ns.reward, cost=ns.cost,
                    cost_weight=ns.cost_weight, soft_temperature=ns.soft_temperature,
                    temperature=ns.temperature, panel=tuple(panel))
    if ns.cost and _threshold(ns) is None:
        log.warning("no harmless threshold for cost %r: pass --harmless-threshold", ns.cost)
    return plan, prompts, cfg, options


def _local_registry(ns: argparse.Namespace):
    """The built-in scorers in this process, for what a --server run scores here."""
    from runtime.scorers import ScorerRegistry, default_factories

    return ScorerRegistry(default_factories(engine_settings(ns).length_target), None)


async def _start_runner(ns: argparse.Namespace, cfg):
    from .runners import HttpRunner, start_in_process

    if ns.server:
        # the server returns candidates' texts; the panel scores them here
        registry = _local_registry(ns) if cfg.panel else None
        return await HttpRunner(ns.server, cfg, api_key=ns.api_key,
                                panel_scorers=registry).start()
    return await start_in_process(engine_settings(ns), cfg)


async def _judge_scorers(ns: argparse.Namespace, runner, judges, registry):
    """The judges' scorers, loaded before the run: from `registry` when given (tests), else
    the in-process runtime's registry, else (--server, fakes) a local one."""
    from . import judge

    if not judges:
        return []
    rt = getattr(runner, "rt", None)
    registry = registry or (rt.scorers if rt is not None else _local_registry(ns))
    return await judge.load(judges, registry)


def _separation_policies(ns: argparse.Namespace) -> list[tuple[str, object]]:
    """(label, model) per --separation entry, resolved before anything slow runs."""
    from finetune.common import resolve_model

    names = parse_list(ns.separation or "")
    if ns.separation_only and not names:
        raise ValueError("--separation-only needs --separation POLICIES")
    if len(set(names)) != len(names):
        raise ValueError("--separation: each policy once")
    return [(name, resolve_model(name, None)) for name in names]


def _separation(ns: argparse.Namespace, policies, prompts, seed: int = 0) -> list[dict]:
    from .separation import measure

    if not policies:
        return []
    harmful = [p.prompt for p in prompts if p.kind == ns.harmful_kind]
    safe = [p.prompt for p in prompts if p.kind != ns.harmful_kind]
    if len(harmful) < 3 or len(safe) < 3:
        raise ValueError(f"--separation needs ≥ 3 prompts of kind {ns.harmful_kind!r} and ≥ 3 "
                         f"of other kinds, got {len(harmful)} and {len(safe)}")
    return measure(policies, safe, harmful, seed=seed)


def separation_only(ns: argparse.Namespace) -> list[dict]:
    """`--separation-only`: separation.json, separation.md and separation.png in --out."""
    import json

    from .separation import PLOT, markdown, plot

    if ns.judge:
        raise ValueError("--judge scores answers: --separation-only generates none")
    policies = _separation_policies(ns)
    results = _separation(ns, policies, load_prompts(ns.prompts, ns.limit), _seed(ns) or 0)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "separation.json").write_text(json.dumps(
        {"prompts": str(ns.prompts), "harmful_kind": ns.harmful_kind, "separation": results},
        indent=2) + "\n")
    (ns.out / "separation.md").write_text("\n".join(markdown(results)))
    plot(ns.out / PLOT, results)
    return results


async def evaluate_prefill(ns: argparse.Namespace, runner=None) -> dict:
    """`--prefill`: every setting at every k on the harmful answers (evaluation/prefill.py)."""
    from tqdm import tqdm

    from . import prefill
    from .harness import run_plan, summaries

    plan, attacks, cfg, options = _validate(ns)
    ks = sorted({0, *parse_list(ns.prefill, int)})
    runner = runner or await _start_runner(ns, cfg)
    by_k: dict[int, list[dict]] = {}
    t0 = time.perf_counter()
    try:
        tokenizer = await _tokenizer(ns, runner)
        with tqdm(total=len(ks) * len(plan) * len(attacks) * ns.samples, desc="prefill",
                  unit="answer", file=sys.stderr) as bar:
            for k in ks:
                runs = await run_plan(runner, prefill.prefill_items(attacks, k, tokenizer), plan,
                                      _threshold(ns), ns.concurrency, bar, samples=ns.samples,
                                      seed=_seed(ns))
                by_k[k] = summaries(runs)
    finally:
        await runner.aclose()
    config = {"mode": f"server {ns.server}" if ns.server else "in-process",
              "model": runner.model_name, "pairs": str(ns.prefill_data),
              "attacks": len(attacks), "k": ks, "settings": [s.label for s in plan],
              "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "reward": cfg.reward,
              "cost": cfg.cost, "cost_weight": cfg.cost_weight,
              "harmless_threshold": _threshold(ns), "samples": ns.samples, "seed": _seed(ns),
              "options": options, "intervals": INTERVALS,
              "total_wall_s": time.perf_counter() - t0}
    prefill.write(ns.out, config, prefill.attack_rows(by_k), by_k)
    return config


async def _tokenizer(ns: argparse.Namespace, runner):
    """The policy's tokenizer, to cut harmful answers at k tokens: the engine's in process, the
    model's own files for --server (the prefill text then goes over the API)."""
    rt = getattr(runner, "rt", None)
    if rt is not None:
        return rt.engine.tokenizer
    from transformers import AutoTokenizer

    from runtime.startup import model_and_name

    path, _ = model_and_name(engine_settings(ns))
    return AutoTokenizer.from_pretrained(path)


async def evaluate(ns: argparse.Namespace, runner=None, scorers=None) -> dict:
    """Run the evaluation described by `ns` and write its report; returns the config written.
    `runner` replaces the one the flags describe and `scorers` the registry the judges come
    from (tests pass fakes)."""
    from tqdm import tqdm

    from . import judge
    from .harness import run_plan, summaries
    from .report import write_report

    plan, prompts, cfg, options = _validate(ns)
    judges = judge.parse_judges(ns.judge, cfg.reward, cfg.cost)
    policies = _separation_policies(ns)
    t_start = time.perf_counter()
    runner = runner or await _start_runner(ns, cfg)
    try:
        judge_scorers = await _judge_scorers(ns, runner, judges, scorers)
        # One discarded answer first, so that the first setting's wall time does not include
        # the engine's warm-up (first batch, scorer first call).
        await runner.answer(prompts[0], plan[0])
        with tqdm(total=len(plan) * len(prompts) * ns.samples, desc="eval", unit="answer",
                  file=sys.stderr) as bar:
            t0 = time.perf_counter()
            runs = await run_plan(runner, prompts, plan, _threshold(ns), ns.concurrency, bar,
                                  samples=ns.samples, seed=_seed(ns))
            wall = time.perf_counter() - t0
        await judge.score_runs(runs, judges, judge_scorers)  # after the timing: not a strategy's
    finally:
        await runner.aclose()
    kinds = sorted({p.kind for p in prompts})
    config = {
        "mode": f"server {ns.server}" if ns.server else "in-process",
        "model": runner.model_name, "prompts": str(ns.prompts), "prompt_count": len(prompts),
        "kinds": kinds, "settings": [s.label for s in plan], "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature, "reward": cfg.reward, "cost": cfg.cost,
        "cost_weight": cfg.cost_weight, "harmless_threshold": _threshold(ns),
        "soft_temperature": cfg.soft_temperature, "options": options,
        "panel": [m.label for m in cfg.panel] or None,
        "judges": [m.label for m in judges] or None, "samples": ns.samples,
        "seed": _seed(ns), "intervals": INTERVALS,
        "concurrency": ns.concurrency, "total_wall_s": wall,
        "startup_s": t0 - t_start,
    }
    separation = _separation(ns, policies, prompts, _seed(ns) or 0)  # after the engine is closed: its memory
    write_report(ns.out, config, summaries(runs), separation)
    return config


def run(ns: argparse.Namespace) -> int:
    """Entry point of the `eval` subcommand (after parsing)."""
    from .runners import EvalError

    try:
        if ns.separation_only:
            for r in separation_only(ns):
                lo, hi = r["bhattacharyya_distance_ci"]
                print(f"{r['policy']}: Bhattacharyya distance {r['bhattacharyya_distance']:.3f} "
                      f"(95% bootstrap [{lo:.3f}, {hi:.3f}]), silhouette {r['silhouette']:.3f}")
            print(f"wrote {ns.out}/separation.json, separation.md and separation.png")
            return 0
        if ns.prefill is not None:
            config = asyncio.run(evaluate_prefill(ns))
            print(f"wrote {ns.out}/prefill.json, prefill.md and prefill_attack.png "
                  f"({config['total_wall_s']:.1f} s)")
            return 0
        config = asyncio.run(evaluate(ns))
    except (ValueError, FileNotFoundError) as exc:  # bad flags, prompts or scorer names
        print(f"alignserve eval: {exc}", file=sys.stderr)
        return 2
    except EvalError as exc:  # a request failed: no partial report
        print(f"alignserve eval: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {ns.out}/results.json, report.md and plots "
          f"({config['total_wall_s']:.1f} s evaluating, {config['startup_s']:.1f} s start-up)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignserve eval", description=__doc__)
    add_arguments(parser)
    ns = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(ns)
