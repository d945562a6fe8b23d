"""`alignserve dual`: CAN's optimal safety weight λ* from a rollout folder.

CAN (Huang et al., arXiv 2405.19544): with reference samples y ~ p, reward r and safety
g = −cost, λ* = argmin_{λ≥0} β·mean_i log mean_k exp((r_ik + λ·(g_ik − b))/β) makes the tilted
policy π_λ* ∝ p·exp((r + λ*·g)/β) meet E[g] ≥ b with the most reward (decoding/dual.py solves
it). MoCAN would relabel preference pairs with w = r + λ*·g.

λ* is the tilted policy's. Best-of-n by r + λ·g is another policy, so the file also stores the
served rule's own λ_BoN(n) for each `--bon-n` (decoding/dual_rules.py: the smallest λ whose exact
best-of-n law on the reference samples meets b, with a bootstrap interval over prompts), the
reference scores themselves (the server solves any other n exactly from them; `--no-reference`
leaves them out), and the sampling the rollouts were drawn with (model, temperature, top_p,
penalties, max_tokens), which the server checks requests against (server/constraint.py).

Scores: the rollouts' stored reward / cost when the names match the manifest's, otherwise the
texts are rescored with the runtime's scorer registry (no engine). Writes a JSON (default
DIR/dual.json) and a PNG of D̂(λ) and the predicted safety against λ, λ* marked.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from decoding.dual import (
    SAMPLING_KEYS,
    DualSolution,
    InfeasibleConstraint,
    achievable_safety,
    dual_objective,
    predicted_safety,
    save_solution,
    solve_dual,
)
from decoding.dual_rules import bon_safety, bon_table
from runtime.plotting import pyplot
from runtime.scorers import ScorerRegistry, default_factories
from valuenet.data import read_rollouts

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rollouts", type=Path, required=True, help="Folder from `alignserve rollouts`.")
    p.add_argument("--reward", default=None, help="Reward scorer (default: the rollouts').")
    p.add_argument("--cost", default=None, help="Cost scorer; safety g = −cost (default: the "
                   "rollouts').")
    p.add_argument("--beta", type=float, required=True, help="KL weight β of CAN's objective.")
    p.add_argument("--threshold", type=float, required=True,
                   help="b in E_π[g] ≥ b, with g = −cost (e.g. −0.1: mean cost at most 0.1).")
    p.add_argument("--out", type=Path, default=None, help="JSON to write (default DIR/dual.json).")
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: --out with .png).")
    p.add_argument("--length-target", type=int, default=64, help="Target of the `length` scorer.")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="Best-of-n's λ meets the threshold with this one-sided bootstrap "
                   "confidence over the reference prompts, not just on their mean (0: on the "
                   "mean; tuned exactly to b on the reference prompts, λ is optimistic for new "
                   "ones). Default 0.95.")
    p.add_argument("--bon-n", default="1,2,4,8,16,32,64,128",
                   help="Comma-separated n for which to store best-of-n's own λ_BoN(n).")
    p.add_argument("--no-reference", action="store_true",
                   help="Do not store the reference scores (the server then serves best-of-n "
                   "with 'auto' only at the --bon-n values).")


def parse_ns(text: str) -> list[int]:
    try:
        ns = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError as exc:
        raise ValueError(f"--bon-n takes comma-separated integers, got {text!r}") from exc
    if not ns or ns[0] < 1:
        raise ValueError(f"--bon-n values must be ≥ 1, got {text!r}")
    return ns


def sampling_record(manifest) -> dict:
    """What the reference samples were drawn with: the manifest's model, temperature and
    max_tokens, and `alignserve rollouts`' neutral values for the controls it never sets
    (decoding.types.Sampling's defaults) unless the manifest records others."""
    extra = manifest.extra or {}
    rec = {"model": manifest.model, "temperature": manifest.temperature, "top_p": 1.0,
           "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
           "repetition_penalty": 1.0, "max_tokens": manifest.max_tokens}
    rec.update({k: extra[k] for k in SAMPLING_KEYS if k in extra and k != "model"})
    return rec


def load_scores(folder: Path, reward: str | None, cost: str | None, length_target: int = 64):
    """(manifest, reward name, cost name, r [N, K], cost [N, K]) from a rollout folder; prompts
    whose sample count differs from the manifest's n (an interrupted write) are left out."""
    manifest, rows = read_rollouts(folder)
    reward, cost = reward or manifest.reward, cost or manifest.cost
    if not cost:
        raise ValueError("no cost: pass --cost (the rollouts were drawn without one)")
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(row.prompt_id, []).append(row)
    full = [sorted(g, key=lambda r: r.sample) for g in groups.values() if len(g) == manifest.n]
    if len(full) < len(groups):
        log.warning("%d prompt(s) without exactly n=%d samples left out",
                    len(groups) - len(full), manifest.n)
    if not full:
        raise ValueError(f"{folder}: no prompt with n={manifest.n} samples")
    registry = None

    def column(name: str, stored: str | None, field: str):
        nonlocal registry
        if name == stored:
            values = [[getattr(r, field) for r in g] for g in full]
            if not any(v is None for vs in values for v in vs):
                return np.array(values, dtype=np.float64)
        if registry is None:
            registry = ScorerRegistry(default_factories(length_target), None)
        scorer = registry.load_now(name)
        log.info("rescoring %d texts with %s", len(full) * manifest.n, name)
        return np.array([scorer.score(g[0].prompt, [r.text for r in g]) for g in full],
                        dtype=np.float64)

    return (manifest, reward, cost, column(reward, manifest.reward, "reward"),
            column(cost, manifest.cost, "cost"))


def plot(path: Path, r, g, beta: float, threshold: float, lam: float,
         bon: dict | None = None) -> None:
    plt = pyplot()
    unit = beta / max(float(np.ptp(g)), 1e-12)
    finite = [e["lambda"] for e in (bon or {}).values() if e.get("lambda") is not None]
    top = max(2.5 * lam, 4 * unit, 1.2 * max(finite, default=0.0))
    grid = np.linspace(0.0, top, 200)
    d = [dual_objective(r, g, beta, threshold, x) for x in grid]
    s = [predicted_safety(r, g, beta, x) for x in grid]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(grid, d)
    a1.axvline(lam, color="C3", ls="--", label=f"λ* = {lam:.4g}")
    a1.set_xlabel("λ")
    a1.set_ylabel("D̂(λ)")
    a1.set_title(f"CAN dual (β = {beta:g}, b = {threshold:g})")
    a1.legend()
    a2.plot(grid, s, color="C1", label="π_λ (tilted)")
    for i, n in enumerate(n for n in sorted(bon or {}) if n > 1):
        a2.plot(grid, [bon_safety(r, g, n, x) for x in grid], color=f"C{4 + i % 6}", lw=1,
                label=f"best-of-{n}")
    a2.axhline(threshold, color="gray", ls=":", label="threshold b")
    a2.axvline(lam, color="C3", ls="--", label="λ*")
    a2.set_xlabel("λ")
    a2.set_ylabel("predicted safety E[g] (mean over prompts)")
    a2.set_title("predicted safety under each rule")
    a2.legend(fontsize=7)
    for ax in (a1, a2):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def solve(ns: argparse.Namespace):
    """Solve for the folder of `ns`; returns (DualSolution, output json path, plot path)."""
    if not ns.beta > 0:
        raise ValueError("--beta must be > 0")
    manifest, reward, cost, r, c = load_scores(ns.rollouts, ns.reward, ns.cost, ns.length_target)
    g = -c
    lam = float(solve_dual(r, g, ns.beta, ns.threshold))  # InfeasibleConstraint: caller
    confidence = getattr(ns, "confidence", 0.95)
    if not 0.0 <= confidence < 1.0:
        raise ValueError("--confidence must lie in [0, 1)")
    bon = bon_table(r, g, ns.threshold, parse_ns(getattr(ns, "bon_n", "1,2,4,8,16,32,64,128")),
                    confidence)
    reference = None if getattr(ns, "no_reference", False) else {"rewards": r.tolist(),
                                                                 "safety": g.tolist()}
    sol = DualSolution(lam=lam, beta=ns.beta, threshold=ns.threshold, reward=reward, cost=cost,
                       predicted_safety=float(predicted_safety(r, g, ns.beta, lam)),
                       reference_safety=float(g.mean()), prompts=r.shape[0],
                       samples=r.shape[1], active=lam > 0, sampling=sampling_record(manifest),
                       best_of_n=bon, reference=reference, bon_confidence=confidence)
    out = ns.out or Path(ns.rollouts) / "dual.json"
    png = ns.plot or out.with_suffix(".png")
    # unconstrained_safety: E[g] under π_0 ∝ p·exp(r/β), the policy λ* corrects.
    save_solution(out, sol, achievable_safety=achievable_safety(g),
                  unconstrained_safety=float(predicted_safety(r, g, ns.beta, 0.0)),
                  rollouts=str(ns.rollouts))
    plot(png, r, g, ns.beta, ns.threshold, lam, bon)
    return sol, out, png


def bon_lines(sol: DualSolution) -> str:
    """One line per stored n: best-of-n's own λ and its predicted safety."""
    lines = []
    for n, e in sorted(sol.best_of_n.items()):
        if e.get("lambda") is None:
            lines.append(f"  best-of-{n}: infeasible (reaches {e['reachable']:.4g} at most)")
        else:
            lo, hi = e["interval"]
            lower = (f"; {e['confidence']:.0%} lower bound {e['lower_bound']:.4g}"
                     if e.get("lower_bound") is not None else "")
            lines.append(f"  best-of-{n}: λ = {e['lambda']:.6g}, predicted E[g] = "
                         f"{e['predicted_safety']:.4g} [{lo:.4g}, {hi:.4g}]{lower}")
    return "\n".join(lines)


def run(ns: argparse.Namespace) -> int:
    """Entry point of the `dual` subcommand (after parsing)."""
    try:
        sol, out, png = solve(ns)
    except InfeasibleConstraint as exc:
        print(f"alignserve dual: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"alignserve dual: {exc}", file=sys.stderr)
        return 2
    state = "active" if sol.active else "inactive: π_0 ∝ p·exp(r/β) already meets it"
    print(f"λ* = {sol.lam:.6g}  (β = {sol.beta:g}, b = {sol.threshold:g}, constraint {state})\n"
          f"predicted safety E_π_λ*[g] = {sol.predicted_safety:.6g}; reference safety E_p[g] = "
          f"{sol.reference_safety:.6g}  ({sol.prompts} prompts × {sol.samples} samples, "
          f"reward {sol.reward}, cost {sol.cost})\nthe served rule's own λ (mean over prompts, "
          f"not per answer):\n{bon_lines(sol)}\nwrote {out} and {png}")
    return 0
