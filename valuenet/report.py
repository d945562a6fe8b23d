"""Training report: correlation of prefix values with the final reward by prefix length, and plots.

The correlation curve is the analysis behind speculative rejection (Sun et al. 2024, arXiv
2410.20290): how well the score of a partial response predicts the reward of its completion as
the prefix grows. For a value head (Mudgal et al. 2024) the same curve says from how many
tokens on its values are worth acting on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from runtime.plotting import pyplot


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def bucket_edges(max_len: int) -> list[int]:
    """Prefix-length buckets [0,1), [1,2), [2,4), [4,8), ... covering 0..max_len: prefix length 0
    is the bare prompt; doubling widths keep a similar number of points in the later buckets."""
    edges = [0, 1]
    while edges[-1] <= max_len:
        edges.append(edges[-1] * 2)
    return edges


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None when undefined (fewer than 3 points or a constant side)."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = math.fsum(xs) / n, math.fsum(ys) / n
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    syy = math.fsum((y - my) ** 2 for y in ys)
    if sxx <= 1e-20 * n or syy <= 1e-20 * n:
        return None
    return sxy / math.sqrt(sxx * syy)


def correlation_by_prefix_length(
    values: Sequence[Sequence[float]], rewards: Sequence[float],
    groups: Sequence[str] | None = None,
) -> list[dict]:
    """values[i][t] = V(x_i, y_i^t) for t = 0..len(y_i); rewards[i] = r(x_i, y_i).

    Every (row, t) pair lands in its bucket of t, so a bucket pools several prefixes of a row;
    `rows` says how many distinct responses a bucket saw. With `groups` (row i's prompt), each
    point is first centred on its prompt's means within the bucket: the within-prompt
    correlation, which is what ranks the candidates of one prompt (blockwise CD, SpR); the
    pooled one also credits a value for telling easy prompts from hard ones.
    """
    max_len = max((len(v) - 1 for v in values), default=0)
    edges = bucket_edges(max_len)
    out = []
    for lo, hi in zip(edges, edges[1:]):
        xs, ys, gs, rows = [], [], [], 0
        for i, (vals, r) in enumerate(zip(values, rewards)):
            chunk = vals[lo:hi]
            xs.extend(chunk)
            ys.extend([r] * len(chunk))
            gs.extend([groups[i] if groups is not None else ""] * len(chunk))
            rows += bool(chunk)
        if groups is not None:
            xs, ys = _centred(xs, gs), _centred(ys, gs)
        if xs:
            out.append({"lo": lo, "hi": hi, "points": len(xs), "rows": rows,
                        "pearson": pearson(xs, ys)})
    return out


def _centred(xs: Sequence[float], groups: Sequence[str]) -> list[float]:
    """xs minus the mean of their group."""
    sums: dict[str, list[float]] = {}
    for x, g in zip(xs, groups):
        acc = sums.setdefault(g, [0.0, 0.0])
        acc[0] += x
        acc[1] += 1
    return [x - sums[g][0] / sums[g][1] for x, g in zip(xs, groups)]


def scorer_on_prefixes(scorer, decode, rows, batch_size: int = 256) -> list[list[float]]:
    """values[i][t] = scorer(prompt_i, decode(y_i[:t])) for t = 0..len(y_i): the reward scorer
    applied to partial answers, the baseline a value head must beat to be worth serving (it
    is what blockwise CD with a text scorer as the value acts on; at t = len(y) it is the
    reward itself). `rows` are Rollout-like (prompt, token_ids); `decode` maps ids to text."""
    pairs = [(r.prompt, decode(r.token_ids[:t])) for r in rows for t in range(len(r.token_ids) + 1)]
    flat: list[float] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        if hasattr(scorer, "score_pairs"):
            flat.extend(scorer.score_pairs(chunk))
        else:
            flat.extend(s for p, text in chunk for s in scorer.score(p, [text]))
    out, at = [], 0
    for r in rows:
        out.append(flat[at : at + len(r.token_ids) + 1])
        at += len(r.token_ids) + 1
    return out


def plot_correlation(curve: list[dict], path: Path, title: str,
                     others: dict[str, list[dict]] | None = None, label: str = "value head") -> None:
    """The head's curve, and `others` (label → curve, e.g. the reward on prefixes) beside it."""
    plot_correlations({label: curve, **(others or {})}, path, title)


def plot_correlations(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, curve in curves.items():
        pts = [(b["lo"], b["pearson"]) for b in curve if b["pearson"] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("prefix length t (bucket start, tokens)")
    ax.set_ylabel("Pearson(V(x, yᵗ), r(x, y))")
    ax.set_ylim(-1.05, 1.05)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path,
                title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], lw=0.8, alpha=0.7, label="train (batch)")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (normalised reward units²)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
