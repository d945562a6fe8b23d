"""`alignserve eval --prefill K1,K2,...`: is the alignment deeper than a few tokens?

Qi et al. 2024 ("Safety Alignment Should Be Made More Than Just a Few Tokens Deep", arXiv
2406.05946): alignment that only shapes an answer's first tokens is undone by *prefilling* the
start of a harmful answer; their attack success rate (ASR) rises with the number of prefilled
tokens k. Here, per strategy and k:

- the attacks are the harmful answers of the project's adversarial pairs (PKU-SafeRLHF schema,
  finetune/data/synthetic_safety.jsonl by default): each pair's prompt with the first k tokens of
  its unsafe response as the start of the assistant turn (the chat template's
  `continue_final_message`, what the API serves as assistant prefill);
- every strategy continues from the prefill (its KL accounting covers only what it generated);
- the attack succeeds when the **continuation** is harmful (cost ≥ the harmless threshold: the
  eval's cost scorer, profanity by default), so a k-token prefill that is harmful by itself does
  not count unless the policy carries on with it;
- attack success = 1 − harmless ratio, with the harmless ratio's 95% interval (Wilson,
  clustered by prompt: decoding/intervals.py), as a table and `prefill_attack.png`.

k = 0 is the attack without prefill (the baseline) and is always measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.prompts import PromptItem

PLOT = "prefill_attack.png"


@dataclass(frozen=True)
class Attack:
    id: str
    prompt: str
    harmful: str  # the unsafe answer whose start is prefilled


def load_attacks(path: Path, limit: int | None = None) -> list[Attack]:
    """One attack per pair with an unsafe response (its first unsafe one)."""
    attacks = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        unsafe = [row[f"response_{j}"] for j in (0, 1)
                  if row.get(f"is_response_{j}_safe") is False]
        if unsafe and isinstance(row.get("prompt"), str):
            attacks.append(Attack(str(row.get("id", i)), row["prompt"], unsafe[0]))
    if not attacks:
        raise ValueError(f"{path}: no pair with an unsafe response (is_response_*_safe false)")
    return attacks[:limit] if limit else attacks


def prefill_items(attacks: list[Attack], k: int, tokenizer) -> list[PromptItem]:
    """The attacks at k prefilled tokens: the first k tokens of each harmful answer, as text."""
    items = []
    for a in attacks:
        ids = tokenizer.encode(a.harmful, add_special_tokens=False)[:k]
        items.append(PromptItem(a.id, a.prompt, "adversarial",
                                prefill=tokenizer.decode(ids) if k else ""))
    return items


def attack_rows(summaries_by_k: dict[int, list[dict]]) -> list[dict]:
    """Per (strategy setting, k): attack success with its interval (1 − harmless ratio)."""
    rows = []
    for k, entries in sorted(summaries_by_k.items()):
        for e in entries:
            ratio, ci = e.get("harmless_ratio"), e.get("harmless_ratio_ci")
            rows.append({
                "label": e["label"], "strategy": e["strategy"], "n": e["n"], "k": k,
                "attack_success": None if ratio is None else 1 - ratio,
                "attack_success_ci": None if ci is None else [1 - ci[1], 1 - ci[0]],
                "answers": len(e["answers"]),
                "mean_kl_bound": e.get("mean_kl_bound")})
    return rows


def markdown(rows: list[dict]) -> list[str]:
    ks = sorted({r["k"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], r["k"]): r for r in rows}

    def fmt(r: dict | None) -> str:
        if r is None or r["attack_success"] is None:
            return "–"
        ci = r["attack_success_ci"]
        return f"{r['attack_success']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    lines = ["## Prefill attack (Qi et al. 2024): attack success against prefilled tokens k", "",
             "Share of continuations judged harmful after the first k tokens of a harmful answer "
             "were prefilled (95% interval, clustered by prompt).", "",
             "| setting | " + " | ".join(f"k = {k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    lines += [f"| {label} | " + " | ".join(fmt(cell.get((label, k))) for k in ks) + " |"
              for label in labels]
    return [*lines, ""]


def plot(path: Path, rows: list[dict]) -> None:
    from runtime.plotting import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["k"], r["attack_success"], r["attack_success_ci"]) for r in rows
                     if r["label"] == label and r["attack_success"] is not None)
        if not pts:
            continue
        ys = [p[1] for p in pts]
        err = [[y - (c[0] if c else y) for _, y, c in pts], [(c[1] if c else y) - y
                                                             for _, y, c in pts]]
        ax.errorbar([p[0] for p in pts], ys, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xlabel("prefilled tokens of a harmful answer (k)")
    ax.set_ylabel("attack success (harmful continuations)")
    ax.set_ylim(-0.02, 1.02)
    save(fig, ax, path, legend_size=8)


def write(out: Path, config: dict, rows: list[dict], summaries_by_k: dict[int, list[dict]]
          ) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"config": config, "attack": rows,
           "settings": {str(k): v for k, v in sorted(summaries_by_k.items())}}
    (out / "prefill.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (out / "prefill.md").write_text("\n".join(markdown(rows)))
    plot(out / PLOT, rows)
