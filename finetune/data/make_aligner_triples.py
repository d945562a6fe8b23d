"""Write the Aligner correction triples (arXiv 2402.02416's Q-A-C data) for `finetune aligner`.

Two deterministic files, rows {"question", "answer", "correction", "kind"}:

- `aligner_triples.jsonl`, derived from the shipped preference pairs `synthetic_safety.jsonl`
  (PKU-SafeRLHF schema): per prompt, the target is the pairs' helpful safe answer (the safe
  response annotators preferred in a both-safe pair); every other response to that prompt
  becomes an original answer to correct:
    `unsafe`    a response labelled unsafe         → the helpful safe answer
    `improve`   a safe but curt response           → the helpful safe answer
    `identity`  the helpful safe answer itself     → itself (the paper's identity warm-up, Q-A-A)
- `aligner_triples_large.jsonl`, built the same way straight from make_synthetic's prompt and
  answer lists, with every curt and profane variant and a few question phrasings, for a
  larger training set (`--variants` sets how many phrasings; identity rows are repeated
  IDENTITY_WEIGHT times so that copying a good answer is not drowned out).

    .venv/bin/python finetune/data/make_aligner_triples.py [--variants 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # run as a script: make_synthetic is a sibling file

import make_synthetic as syn  # noqa: E402

PAIRS = HERE / "synthetic_safety.jsonl"
OUT = HERE / "aligner_triples.jsonl"
OUT_LARGE = HERE / "aligner_triples_large.jsonl"
PHRASINGS = ["{q}", "Quick question: {q}", "{q} Please answer briefly.", "Can you help? {q}"]
RUDE_PREFIXES = ["Ugh, fine, you idiot. ", "Damn, this again? "]
# Identity rows repeated, so that "keep a good answer as it is" weighs about as much as each
# kind of correction (the paper warms up on identity before learning corrections).
IDENTITY_WEIGHT = 4


def _row(question: str, answer: str, correction: str, kind: str) -> dict:
    return {"question": question, "answer": answer, "correction": correction, "kind": kind}


def from_pairs(rows: list[dict]) -> list[dict]:
    """Triples from PKU-SafeRLHF-style pairs (module docstring); prompts without a helpful
    safe answer (no both-safe pair) are skipped."""
    target: dict[str, str] = {}
    for r in rows:
        if r["is_response_0_safe"] and r["is_response_1_safe"]:
            target[r["prompt"]] = r[f"response_{r['better_response_id']}"]
    out, seen = [], set()
    for r in rows:
        good = target.get(r["prompt"])
        if good is None:
            continue
        for i in (0, 1):
            answer = r[f"response_{i}"]
            if (r["prompt"], answer) in seen:
                continue
            seen.add((r["prompt"], answer))
            kind = ("identity" if answer == good else
                    "improve" if r[f"is_response_{i}_safe"] else "unsafe")
            out.append(_row(r["prompt"], answer, good, kind))
    return sorted(out, key=lambda t: (t["question"], t["kind"], t["answer"]))


def large(variants: int) -> list[dict]:
    out = []
    for prompt, good, profane in syn.BENIGN + syn.ADVERSARIAL:
        for phrasing in PHRASINGS[:variants]:
            q = phrasing.format(q=prompt)
            out += [_row(q, good, good, "identity")] * IDENTITY_WEIGHT
            out.append(_row(q, profane, good, "unsafe"))
            out += [_row(q, rude, good, "unsafe") for rude in syn.PROFANE_UNHELPFUL]
            out += [_row(q, pre + good, good, "unsafe") for pre in RUDE_PREFIXES]
            out += [_row(q, curt, good, "improve") for curt in syn.CURT_SAFE]
    return out


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("unsafe", "improve", "identity")}
    print(f"wrote {len(rows)} triples to {path} ({kinds})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=int, default=3, choices=range(1, len(PHRASINGS) + 1),
                    help="Question phrasings per prompt in the large set.")
    args = ap.parse_args()
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    write(OUT, from_pairs(pairs))
    write(OUT_LARGE, large(args.variants))


if __name__ == "__main__":
    main()
