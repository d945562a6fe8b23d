"""Training report of `alignserve finetune`: report.json, report.md and loss_curve.png.

Margins are the implicit DPO reward margins β·(log π_θ/π_ref(ỹ_w) − log π_θ/π_ref(ỹ_l)) without
SafeDPO's offset, accuracies the share of pairs with a positive margin; `loss` is the method's
own loss (SafeDPO with Δ, or DPO) averaged over all pairs of a split. "before" is step 0, where
the policy equals the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.plotting import pyplot, save

STAT_ROWS = (("loss", "loss"), ("reward_margin", "reward margin"), ("accuracy", "accuracy"),
             ("accuracy_unsafe_rejected", "accuracy (unsafe rejected)"),
             ("chosen_reward", "chosen reward"), ("rejected_reward", "rejected reward"),
             ("kl_estimate", "Donsker–Varadhan lower bound of KL(D⁺‖D⁻) (KLDO)"),
             ("ratio_max", "max r_θ = π_θ/π_ref (RDRO)"), ("ratio_bound", "bound 1/α (RDRO)"))

# What a report must say about a method's fidelity (by the method name's first word).
METHOD_NOTES = {
    "pro": "the regulariser is RECONSTRUCTED: the paper's hyper-response approximation and its "
           "weight could not be read, so finetune/losses.py's form is this project's "
           "reconstruction (not the paper's full regulariser)",
    "rdro": "the loss is RECONSTRUCTED from the paper's abstract (finetune/rdro.py): logistic "
            "fit of the relative ratio p⁺/(α·p⁺ + (1−α)·p⁻); no equation number",
    "kldo": "the KL row is the Donsker–Varadhan lower bound with the implicit reward as critic "
            "(unnormalised, whatever `normalize` training used)",
}


def plot_loss(path: Path, curve: list[tuple[int, float]], before: dict, after: dict,
              steps: int, title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    if curve:
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label="batch loss")
    for i, split in enumerate(before):
        ax.plot([0, steps], [before[split]["loss"], after[split]["loss"]], ls="--", marker="o",
                color=f"C{i + 1}", label=f"{split} loss (all pairs)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    save(fig, ax, path)


def _fmt(stats: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in stats.items())


def _markdown(report: dict) -> str:
    lines = [f"# alignserve finetune {report['method']}", "",
             f"- base model: `{report['config']['model']}`",
             f"- output: `{report['output']}` ({report['output_kind']})",
             f"- data: `{report['data']['source']}`, {report['data']['pairs']} pairs",
             *(f"  - {split}: {_fmt(report['data'][split])}" for split in ("train", "held_out")
               if report["data"].get(split)),
             f"- steps: {report['steps']}, {report['steps_per_s']:.3f} steps/s, "
             f"training {report['train_s']:.1f} s, {report['trainable_params']:,} trainable "
             "parameters", ""]
    note = METHOD_NOTES.get(str(report["method"]).split()[0])
    if note:
        lines[-1:-1] = [f"- note: {note}"]
    if report.get("lambda") is not None:
        lam = report["lambda"]
        lines[-1:-1] = [f"- λ* = {lam['value']:.6g} from {lam['source']}"]
    beta = report.get("beta")
    if beta is not None:
        tie = f", dual's β {beta['beta_dual']:g}" if beta.get("beta_dual") is not None else ""
        lines[-1:-1] = [f"- DPO β = {beta['value']:.6g} ({beta['source']}{tie})"]
        if beta.get("warning"):
            lines[-1:-1] = [f"- **warning**: {beta['warning']}"]
    splits = list(report["after"])  # train first, then held_out
    head = "| metric | " + " | ".join(f"{s} before | {s} after" for s in splits) + " |"
    lines += [head, "|---|" + "---:|" * (2 * len(splits))]
    for key, label in STAT_ROWS:
        if not any(key in report["after"][s] for s in splits):
            continue
        cells = []
        for s in splits:
            for phase in ("before", "after"):
                v = report[phase][s].get(key)
                cells.append("" if v is None else f"{v:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "pairs: " + ", ".join(f"{s} {report['after'][s]['pairs']}" for s in splits),
              "", "![loss curve](loss_curve.png)", ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    """Write report.json, report.md and loss_curve.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(out / "loss_curve.png", report["loss_curve"], report["before"], report["after"],
              report["steps"], f"{report['method']} (β = {report['config']['beta']:g})")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
