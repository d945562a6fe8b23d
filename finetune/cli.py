"""`alignserve finetune {safedpo,mocan,kldo,pro,rdro,bond,vbon,aligner}`: fine-tuning → checkpoint.

safedpo / mocan: preference pairs → (transform | relabel) → DPO; kldo / pro / rdro: other feedback
shapes (finetune/feedback.py, finetune/loop.py); bond / vbon: best-of-n distillation from rollouts
(finetune/bond_cli.py); aligner: SFT of an Aligner corrector on triples (finetune/aligner.py).

    alignserve finetune safedpo --data pairs.jsonl --out ckpt [--beta 0.1 --delta 10]
    alignserve finetune mocan   --data pairs.jsonl --out ckpt (--lambda X | --dual dual.json |
                                --rollouts DIR --dual-beta B --threshold b) [--reward relevance
                                --cost profanity]
    alignserve finetune kldo    --data pairs.jsonl --out ckpt [--beta 0.1 --ema-rate 0.1]
    alignserve finetune pro     --data pairs.jsonl --out ckpt --feedback pairwise|binary|scalar
                                [--beta 0.1 --alpha 2]
    alignserve finetune rdro    --data pairs.jsonl --out ckpt [--alpha 0.5 --beta 1]
                                (finetune/rdro.py; RECONSTRUCTED from the paper's abstract)
    alignserve finetune aligner --out adapter [--data triples.jsonl --steps 40]
                                (finetune/aligner_cli.py: a LoRA corrector for the `aligner` strategy)

The preference methods write a servable folder (merged safetensors + tokenizer, or `--save-adapter`
for a LoRA adapter) and report.json / report.md / loss_curve.png next to it, with KL(π_θ‖π_ref) on
held-out prompts through training (finetune/kl_track.py: kl_curve.png, warnings past 15 and 100
nats). `add_arguments` fills the subparser of cli/main.py; the module imports only the standard
library and the pure data modules, torch / TRL / PEFT load inside `run`. SafeDPO and MoCAN train
on TRL's DPOTrainer (finetune/trainer.py), KLDO, PRO and RDRO in an explicit loop (finetune/loop.py,
finetune/methods.py, finetune/rdro.py) on feedback built from the pairs (finetune/feedback.py).
Exit status: 0 done, 2 bad flags or data (a message, no traceback), 1 the training or an
infeasible dual failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import aligner_cli, augment, bond_cli
from .common import (
    PROG,
    add_weight_flags,
    check_run_flags,
    check_weight_flags,
    resolve_model,
)
from .pairs import load_pairs, split_pairs

log = logging.getLogger(__name__)


def _add_common(p: argparse.ArgumentParser) -> None:
    # The dests are this command's own names, apart from the engine's and the server's settings
    # (base_model, model_home, dual_file, scorer_length_target): no reader mistakes one for them.
    p.add_argument("--data", required=True, help="Preference pairs, PKU-SafeRLHF schema: a "
                   ".jsonl/.json file, a local dataset folder, or a `datasets` name.")
    p.add_argument("--split", default="train", help="Split for folders / dataset names.")
    p.add_argument("--limit", type=int, default=None, help="Use only the first N pairs.")
    p.add_argument("--out", type=Path, required=True, help="Output folder (checkpoint + report).")
    p.add_argument("--model", dest="base_model", default="embedded", help="Base policy: 'embedded' "
                   "(SmolLM2-135M-Instruct under ALIGNSERVE_HOME), a local folder or an HF id.")
    p.add_argument("--home", dest="model_home", type=Path, default=None,
                   help="Cache folder of the embedded model (default ALIGNSERVE_HOME or "
                   "~/.cache/alignserve).")
    add_weight_flags(p)
    p.add_argument("--beta", type=float, default=None, help="DPO KL weight β (safedpo: 0.1; "
                   "mocan: β_dual/τ from --dual / --dual-beta, 0.1 with --lambda).")
    p.add_argument("--steps", type=int, default=20, help="Optimiser steps.")
    p.add_argument("--lr", type=float, default=None,
                   help="Learning rate (default 1e-4 with LoRA, 1e-5 full).")
    p.add_argument("--batch-size", type=int, default=None, help="Pairs per step (default 4; "
                   "kldo and pro --feedback binary|scalar: completions per step, default 8).")
    p.add_argument("--max-length", type=int, default=160,
                   help="Tokens per prompt+response sequence (longer ones are truncated).")
    p.add_argument("--held-out", type=float, default=0.2,
                   help="Share of pairs kept out of training for the report, in [0, 1).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the split, labels and training.")
    _add_kl_flags(p)


def _add_kl_flags(p: argparse.ArgumentParser) -> None:
    from .kl_track import KLTrackConfig

    d = KLTrackConfig()
    kl = p.add_argument_group("KL(π_θ‖π_ref) through training (finetune/kl_track.py)")
    kl.add_argument("--kl-every", type=int, default=d.every, help="Estimate KL on held-out "
                    "prompts every K optimiser steps (and at the last); 0: off.")
    kl.add_argument("--kl-prompts", type=int, default=d.prompts,
                    help="Held-out prompts per estimate.")
    kl.add_argument("--kl-samples", type=int, default=d.samples,
                    help="Answers sampled from π_θ per prompt.")
    kl.add_argument("--kl-tokens", type=int, default=d.max_new_tokens, help="New tokens per "
                    "sampled answer (KL of the first K tokens: a lower bound of the answer's).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="method", required=True,
                                metavar="{safedpo,mocan,kldo,pro,rdro,bond,vbon,aligner}")
    safe = sub.add_parser("safedpo", help="SafeDPO (arXiv 2505.20065): safety-aware transform "
                          "of the pairs, DPO loss with a safety offset Δ.")
    _add_common(safe)
    safe.add_argument("--delta", type=float, default=10.0,
                      help="Safety offset Δ ≥ 0 (0: DPO on the transformed pairs).")
    safe.add_argument("--both-unsafe", choices=("drop", "keep"), default="drop",
                      help="Pairs whose two answers are both unsafe: drop them (default; both "
                           "have r_c = −∞, so the pair says nothing about the constrained "
                           "optimum) or keep them as plain DPO pairs (finetune/safedpo.py).")
    augment.add_arguments(safe)
    mocan = sub.add_parser("mocan", help="MoCAN (arXiv 2405.19544): relabel pairs with "
                           "σ(w₁ − w₀), w = r + λ*·g, then DPO.")
    _add_common(mocan)
    augment.add_arguments(mocan)
    lam = mocan.add_mutually_exclusive_group(required=True)
    lam.add_argument("--lambda", dest="lam", type=float, help="λ* given directly (≥ 0).")
    lam.add_argument("--dual", dest="dual_file", type=Path,
                     help="JSON written by `alignserve dual` (key lambda).")
    lam.add_argument("--rollouts", type=Path,
                     help="Rollout folder: solve λ* here (needs --dual-beta, --threshold).")
    mocan.add_argument("--dual-beta", type=float, default=None,
                       help="β of CAN's dual, with --rollouts.")
    mocan.add_argument("--threshold", type=float, default=None,
                       help="b in E[g] ≥ b (g = −cost), with --rollouts.")
    mocan.add_argument("--reward", default="relevance", help="Reward scorer r (runtime/scorers.py).")
    mocan.add_argument("--cost", default="profanity", help="Cost scorer; safety g = −cost.")
    mocan.add_argument("--temperature", type=float, default=1.0,
                       help="τ in P(y₁ ≻ y₀) = σ((w₁ − w₀)/τ).")
    mocan.add_argument("--allow-beta-mismatch", action="store_true",
                       help="Train with a --beta for which τ·β ≠ the dual's β (refused "
                            "otherwise: the policy would not be CAN's π_λ*); the report warns.")
    mocan.add_argument("--length-target", dest="scorer_length_target", type=int, default=64,
                       help="Target of the `length` scorer.")
    kldo = sub.add_parser("kldo", help="KLDO (arXiv 2502.00657): KL-divergence estimator loss "
                          "on aligned / unaligned (compliance / refusal) completions.")
    _add_common(kldo)
    kldo.add_argument("--ema-rate", type=float, default=0.1,
                      help="Moving-average rate of the log-mean-exp gradient in [0, 1] "
                           "(0: plain batch estimate); the average restarts every epoch.")
    kldo.add_argument("--no-normalize", dest="normalize", action="store_false",
                      help="Do not rescale the unaligned term by min(a, u)/u (the reference "
                           "trainer's default `normalize`, finetune/losses.py kldo_loss).")
    pro = sub.add_parser("pro", help="PRO (arXiv 2505.23316): DPO decomposed, with a "
                         "RECONSTRUCTED hyper-response regulariser (the paper's exact form could "
                         "not be read; finetune/losses.py); pairwise, binary or scalar feedback.")
    _add_common(pro)
    pro.add_argument("--feedback", required=True, choices=("pairwise", "binary", "scalar"),
                     help="pairwise: SafeDPO's pairs; binary: ±½ per answer from the safety "
                          "labels; scalar: s(y) = win rate − ½ (finetune/feedback.py).")
    pro.add_argument("--alpha", type=float, default=2.0,
                     help="Weight α of the regulariser (> 0; > 1 for binary and scalar).")
    rdro = sub.add_parser("rdro", help="RDRO (arXiv 2604.04410, loss RECONSTRUCTED from the "
                          "abstract): the policy fits the relative density ratio p⁺/(α·p⁺ + "
                          "(1−α)·p⁻) ≤ 1/α on preferred / non-preferred completions.")
    _add_common(rdro)
    rdro.add_argument("--alpha", type=float, default=0.5,
                      help="Mixture weight α in (0, 1): the ratio is bounded by 1/α "
                           "(reconstructed default 0.5; the preferred share of the data makes "
                           "π_ref·r_α the preferred distribution). --beta defaults to 1 here.")
    bond_cli.add_parsers(sub)
    aligner_cli.add_arguments(sub)  # its own flags and run (finetune/aligner_cli.py)


def check_flags(ns: argparse.Namespace) -> None:
    """Every flag problem that needs no data or model, as a ValueError."""
    if ns.beta is not None and not ns.beta > 0:
        raise ValueError("--beta must be > 0")
    if ns.batch_size is None:  # pairs (4) or completions (8): about the same tokens per step
        ns.batch_size = 8 if ns.method in ("kldo", "rdro") or getattr(ns, "feedback", "") in (
            "binary", "scalar") else 4
    if ns.steps < 1 or ns.batch_size < 1:
        raise ValueError("--steps and --batch-size must be ≥ 1")
    check_run_flags(ns)
    check_weight_flags(ns)
    if ns.method == "safedpo" and not ns.delta >= 0:
        raise ValueError("--delta must be ≥ 0")
    if ns.method == "mocan":
        if ns.lam is not None and not ns.lam >= 0:
            raise ValueError("--lambda must be ≥ 0")
        if ns.rollouts is not None and (ns.dual_beta is None or ns.threshold is None):
            raise ValueError("--rollouts needs --dual-beta and --threshold")
        if ns.rollouts is None and (ns.dual_beta is not None or ns.threshold is not None):
            raise ValueError("--dual-beta and --threshold only apply with --rollouts")
        if not ns.temperature > 0:
            raise ValueError("--temperature must be > 0")
    if ns.method == "rdro" and not 0 < ns.alpha < 1:
        raise ValueError("--alpha must lie in (0, 1) for rdro: the ratio's bound is 1/α")
    if min(ns.kl_every, ns.kl_prompts, ns.kl_samples, ns.kl_tokens) < 0 or min(
            ns.kl_prompts, ns.kl_samples, ns.kl_tokens) < 1:
        raise ValueError("--kl-every must be ≥ 0 and --kl-prompts, --kl-samples, --kl-tokens ≥ 1")
    if ns.method == "kldo" and not 0 <= ns.ema_rate <= 1:
        raise ValueError("--ema-rate must lie in [0, 1]")
    if ns.method == "pro":
        if not ns.alpha > 0:
            raise ValueError("--alpha must be > 0")
        if ns.feedback != "pairwise" and not ns.alpha > 1:
            raise ValueError(f"--alpha must be > 1 with --feedback {ns.feedback}: the loss's "
                             "minimiser σ(r) = ½ + s/α is finite only for α > 2·|s| = 1")


def resolve_lambda(ns: argparse.Namespace) -> dict:
    """MoCAN's λ*: {value, source, detail} from --lambda, --dual or --rollouts."""
    from .mocan import lambda_from_dual_file, lambda_from_rollouts

    if ns.lam is not None:
        return {"value": ns.lam, "source": "--lambda", "detail": {}}
    src = (lambda_from_dual_file(ns.dual_file) if ns.dual_file is not None else
           lambda_from_rollouts(ns.rollouts, ns.reward, ns.cost, ns.dual_beta, ns.threshold,
                                ns.scorer_length_target))
    for key in ("reward", "cost"):
        if src.detail.get(key) not in (None, getattr(ns, key)):
            log.warning("λ* was solved for %s %r, relabelling uses %r", key, src.detail[key],
                        getattr(ns, key))
    return {"value": src.value, "source": src.source, "detail": src.detail}


def resolve_beta(ns: argparse.Namespace, lam: dict | None) -> dict:
    """DPO's β: {value, source, beta_dual, warning}; MoCAN ties it to the dual's β
    (finetune/mocan.py `tied_beta`; a mismatch is a ValueError unless allowed)."""
    from .mocan import DEFAULT_BETA, tied_beta

    if lam is None:  # SafeDPO, KLDO, PRO; RDRO's ratio has no temperature by default (β = 1)
        default = 1.0 if ns.method == "rdro" else DEFAULT_BETA
        value = ns.beta if ns.beta is not None else default
        return {"value": value, "source": "--beta" if ns.beta is not None else "default",
                "beta_dual": None, "warning": None}
    beta_dual = lam["detail"].get("beta")
    value, source, warning = tied_beta(beta_dual, ns.temperature, ns.beta,
                                       ns.allow_beta_mismatch)
    if warning:
        log.warning("%s", warning)
    return {"value": value, "source": source, "beta_dual": beta_dual, "warning": warning}


def _mocan_examples(ns: argparse.Namespace, lam: float, splits: list[list]) -> list[tuple]:
    """Score every split's pairs with the reward and cost scorers, then relabel them."""
    from runtime.scorers import ScorerRegistry, UnknownScorer, default_factories

    from .mocan import mocan_relabel, score_pairs

    registry = ScorerRegistry(default_factories(ns.scorer_length_target), None)
    try:
        reward, cost = registry.load_now(ns.reward), registry.load_now(ns.cost)
    except UnknownScorer as exc:
        raise ValueError(str(exc)) from None
    out = []
    for i, pairs in enumerate(splits):
        if not pairs:
            out.append(([], {}))
            continue
        r, c = score_pairs(pairs, reward, cost)
        # a different seed per split, so held-out labels are not the train labels' twins
        examples, stats = mocan_relabel(pairs, r, c, lam, ns.seed + i, ns.temperature)
        out.append((examples, {**stats, "reward": ns.reward, "cost": ns.cost}))
    return out


def _prepare(ns: argparse.Namespace):
    """Flags, data, λ*, model path, examples: everything before training, cheapest checks
    first. Raises ValueError / FileNotFoundError on bad input."""
    from .safedpo import safedpo_transform

    check_flags(ns)
    pairs = load_pairs(ns.data, ns.split, ns.limit)
    splits = list(split_pairs(pairs, ns.held_out, ns.seed))
    lam = None
    if ns.method in LOOP_METHODS:
        (train_ex, train_stats), (eval_ex, eval_stats) = [
            _loop_examples(ns, p) if p else ([], {}) for p in splits]
        if ns.method in ("kldo", "rdro") and not (train_stats.get("positive")
                                                  and train_stats.get("negative")):
            raise ValueError(f"{ns.method} needs aligned and unaligned completions, got "
                             f"{train_stats}")
        if not train_ex:
            raise ValueError(f"{ns.method}: no training examples ({train_stats})")
        beta = resolve_beta(ns, None)
        model = resolve_model(ns.base_model, ns.model_home)
    elif ns.method == "safedpo":  # pure and cheap: before the model is looked up
        (train_ex, train_stats), (eval_ex, eval_stats) = [
            safedpo_transform(p, ns.both_unsafe) if p else ([], {}) for p in splits]
        if not train_ex:
            raise ValueError(f"no training pairs left after SafeDPO's transform ({train_stats}):"
                             " every pair has two unsafe responses")
        beta = resolve_beta(ns, None)
        model = resolve_model(ns.base_model, ns.model_home)
        train_ex, train_stats = augment.apply(ns, train_ex, train_stats, model)
    else:
        lam = resolve_lambda(ns)
        beta = resolve_beta(ns, lam)  # before the slow scoring: a mismatch stops here
        model = resolve_model(ns.base_model, ns.model_home)
        (train_ex, train_stats), (eval_ex, eval_stats) = _mocan_examples(ns, lam["value"], splits)
        train_ex, train_stats = augment.apply(ns, train_ex, train_stats, model)
    data = {"source": str(ns.data), "pairs": len(pairs), "train": train_stats,
            "held_out": eval_stats}
    return model, train_ex, eval_ex, data, lam, beta


LOOP_METHODS = ("kldo", "pro", "rdro")  # trained by finetune/loop.py, not TRL's DPOTrainer


def _loop_examples(ns: argparse.Namespace, pairs: list) -> tuple[list, dict]:
    """KLDO's or PRO's examples from one split's pairs, with their counts."""
    from . import feedback

    if ns.method == "pro" and ns.feedback == "pairwise":
        return feedback.pairwise_feedback(pairs)
    completions = (feedback.kldo_sets(pairs) if ns.method in ("kldo", "rdro")
                   else feedback.FEEDBACK[ns.feedback](pairs))
    return completions, feedback.stats(completions)


def _objective(ns: argparse.Namespace, examples: list, beta: float):
    from .methods import kldo_objective, pro_pairwise_objective, pro_unpaired_objective
    from .rdro import rdro_objective

    if ns.method == "rdro":
        return rdro_objective(examples, beta, ns.alpha)
    if ns.method == "kldo":
        return kldo_objective(examples, beta, ns.ema_rate, ns.normalize)
    if ns.feedback == "pairwise":
        return pro_pairwise_objective(examples, beta, ns.alpha)
    return pro_unpaired_objective(examples, beta, ns.alpha, f"pro-{ns.feedback}")


def _train(ns: argparse.Namespace, cfg, train_ex, eval_ex, tracker):
    """The TrainResult of the method's trainer (TRL's for SafeDPO / MoCAN, the loop's else);
    `tracker` (or None) estimates KL(π_θ‖π_ref) through training."""
    if ns.method in LOOP_METHODS:
        from .loop import train_objective

        held = _objective(ns, eval_ex, cfg.beta) if eval_ex else None
        return train_objective(cfg, _objective(ns, train_ex, cfg.beta), held,
                               on_step=tracker.on_step if tracker is not None else None)
    from .trainer import train

    return train(cfg, train_ex, eval_ex, ns.delta if ns.method == "safedpo" else 0.0, tracker)


def _kl_tracker(ns: argparse.Namespace, model, train_ex, eval_ex):
    """A KLTracker on the held-out prompts (training prompts without a held-out split)."""
    from .kl_track import KLTrackConfig, KLTracker, held_out_prompts

    prompts, source = held_out_prompts(eval_ex, train_ex)
    if not ns.kl_every or not prompts:
        return None
    cfg = KLTrackConfig(every=ns.kl_every, prompts=ns.kl_prompts, samples=ns.kl_samples,
                        max_new_tokens=ns.kl_tokens, seed=ns.seed)
    return KLTracker(cfg, prompts, str(model), source)


def _track_kl(tracker, steps: int, out: Path) -> dict | None:
    """Step 0 and the last step when the trainer's hook did not record them."""
    if tracker is None:
        return None
    tracker.record_reference()
    if steps not in tracker.steps:
        tracker.measure_checkpoint(steps, out)
    return tracker.summary()


def _method_config(ns: argparse.Namespace) -> dict:
    """The method's own flags, for the report."""
    keys = {"safedpo": ("delta", "both_unsafe"), "kldo": ("ema_rate", "normalize"),
            "pro": ("feedback", "alpha"), "rdro": ("alpha",)}
    return {k: getattr(ns, k) for k in keys.get(ns.method, ())}


def _train_and_report(ns: argparse.Namespace, model, train_ex, eval_ex, data, lam,
                      beta: dict) -> dict:
    from dataclasses import asdict

    from .report import write_report
    from .trainer import TrainConfig

    cfg = TrainConfig(model=Path(model) if not isinstance(model, str) else model, out=ns.out,
                      beta=beta["value"], steps=ns.steps, batch_size=ns.batch_size,
                      lr=ns.lr if ns.lr is not None else (1e-4 if ns.lora else 1e-5),
                      max_length=ns.max_length, lora=ns.lora, lora_r=ns.lora_r,
                      lora_alpha=ns.lora_alpha, save_adapter=ns.save_adapter, seed=ns.seed)
    tracker = _kl_tracker(ns, model, train_ex, eval_ex)
    result = _train(ns, cfg, train_ex, eval_ex, tracker)
    kl = _track_kl(tracker, ns.steps, ns.out)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    method = f"pro ({ns.feedback})" if ns.method == "pro" else ns.method
    extra = _method_config(ns) if ns.method != "mocan" else {"delta": 0.0}
    report = {"method": method, "config": {**config, **extra, "held_out": ns.held_out},
              "output": str(ns.out),
              "output_kind": "LoRA adapter" if cfg.save_adapter else "merged safetensors",
              "data": data, "lambda": lam, "beta": beta, "steps": ns.steps, "train_s": result.train_s,
              "steps_per_s": result.steps_per_s, "trainable_params": result.trainable_params,
              "before": result.before, "after": result.after,
              "loss_curve": [list(x) for x in result.loss_curve], "kl": kl}
    write_report(ns.out, report)
    if kl is not None:
        from .kl_track import write_kl_report

        write_kl_report(ns.out, kl, f"{method}: KL(π_θ‖π_ref) on held-out prompts")
    return report


def run(ns: argparse.Namespace) -> int:
    """Entry point of the `finetune` subcommand (after parsing)."""
    if ns.method in ("bond", "vbon"):
        return bond_cli.run(ns)
    if ns.method == "aligner":  # SFT on triples: none of the preference-pair steps below
        return aligner_cli.run(ns)
    try:
        prepared = _prepare(ns)
    except (ValueError, FileNotFoundError) as exc:  # PairSchemaError is a ValueError
        from decoding.dual import InfeasibleConstraint

        print(f"{PROG} {ns.method}: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, InfeasibleConstraint) else 2
    try:
        report = _train_and_report(ns, *prepared)
    except (RuntimeError, OSError, ValueError) as exc:  # model load, out of memory, disk
        print(f"{PROG} {ns.method}: training failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    after = report["after"]["train"]
    before = report["before"]["train"]
    print(f"{ns.method}: {report['steps']} steps in {report['train_s']:.1f} s "
          f"({report['steps_per_s']:.3f} steps/s); train loss {before['loss']:.4f} → "
          f"{after['loss']:.4f}, accuracy {after['accuracy']:.3f}, margin "
          f"{after['reward_margin']:.4f}\nwrote {ns.out} ({report['output_kind']}) and "
          f"report.json, report.md, loss_curve.png")
    kl = report.get("kl")
    if kl and kl["final"]:
        final = kl["final"]
        ci = final["ci95"]
        print(f"KL(π_θ‖π_ref) on {kl['prompts_source'].replace('_', '-')} prompts at step "
              f"{final['step']}: {final['kl']:.3f} nats"
              + (f" (95% CI {ci[0]:.3f} – {ci[1]:.3f})" if ci else "") + "; kl_curve.png")
        for warning in kl["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


SYNTHETIC = Path(__file__).resolve().parent / "data" / "synthetic_safety.jsonl"


def train_checkpoint(method: str, out: Path, *flags: str, data: Path | str = SYNTHETIC) -> dict:
    """Train `method` (safedpo, mocan, kldo, pro) as the command would and return its report
    (the checkpoint is in `out`); `flags` are the command's own, e.g. ("--feedback", "binary",
    "--steps", "20"). For benchmarks: raises ValueError / RuntimeError instead of exiting."""
    parser = argparse.ArgumentParser(prog=PROG)
    add_arguments(parser)
    ns = parser.parse_args([method, "--data", str(data), "--out", str(out), *flags])
    return _train_and_report(ns, *_prepare(ns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    ns = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(ns)


if __name__ == "__main__":
    sys.exit(main())
