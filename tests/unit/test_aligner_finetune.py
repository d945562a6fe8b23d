"""`finetune aligner` data and loss (arXiv 2402.02416): the corrector is trained on the
correction tokens only, −log μ(y_c | y_o, x), with the prompt the served strategy builds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import FakeTokenizer

from decoding.aligner import corrector_prompt
from finetune.aligner import (
    IGNORE,
    Triple,
    TripleSchemaError,
    build_example,
    collate,
    load_triples,
    masked_nll,
    split_triples,
)

DATA = Path(__file__).resolve().parents[2] / "finetune" / "data"


class Tok(FakeTokenizer):
    eos_token_id = 9_999


def test_example_masks_the_prompt_and_labels_the_correction_plus_eos():
    tok = Tok()
    t = Triple("how are you", "darn bad", "good nice")
    ids, labels = build_example(tok, t, max_length=64)
    prompt = tok.encode(corrector_prompt(t.question, t.answer))
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] == tok.encode("good nice") + [9_999]
    short_ids, short_labels = build_example(tok, t, max_length=len(prompt) + 1)  # tail cut
    assert short_labels[len(prompt):] == tok.encode("good")
    with pytest.raises(ValueError):
        build_example(tok, t, max_length=len(prompt))


def test_masked_nll_is_the_mean_correction_nll_by_hand():
    import torch

    # vocabulary of 3; logits at position t predict token t+1
    logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[IGNORE, IGNORE, 0, 2]])  # positions 2, 3 are the correction
    loss, count = masked_nll(logits, labels)
    # −log softmax(logits[1])[0] and −log softmax(logits[2])[2]
    lp1 = 2.0 - math.log(math.exp(2) + 2)
    lp2 = 3.0 - math.log(2 + math.exp(3))
    assert count == 2
    assert float(loss) == pytest.approx(-(lp1 + lp2) / 2, rel=1e-6)
    # the prompt's logits do not matter; padding labels do not count
    logits2 = logits.clone()
    logits2[0, 0] = torch.tensor([9.0, -9.0, 0.0])
    assert float(masked_nll(logits2, labels)[0]) == pytest.approx(float(loss))


def test_collate_pads_right_with_ignored_labels():
    ids, mask, labels = collate([([1, 2, 3], [IGNORE, 2, 3]), ([4], [4])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


def test_loader_refuses_bad_rows_naming_the_line(tmp_path):
    good = {"question": "q", "answer": "a", "correction": "c"}
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "correction": 3}) + "\n")
    with pytest.raises(TripleSchemaError, match=":2:"):
        load_triples(f)
    f.write_text(json.dumps(good) + "\n\n")
    assert load_triples(f) == [Triple("q", "a", "c")]


def test_split_keeps_questions_apart_and_is_seeded():
    triples = [Triple(f"q{i}", "a", "c") for i in range(10) for _ in range(3)]
    train, held = split_triples(triples, 0.2, seed=0)
    assert {t.question for t in train}.isdisjoint({t.question for t in held})
    assert len(held) == 6 and split_triples(triples, 0.2, seed=0) == (train, held)
    assert split_triples(triples, 0.0, seed=0) == (triples, [])


def test_shipped_triples_are_reproduced_by_the_script_and_load(tmp_path):
    before = {p: (DATA / p).read_text() for p in ("aligner_triples.jsonl",
                                                  "aligner_triples_large.jsonl")}
    subprocess.run([sys.executable, str(DATA / "make_aligner_triples.py")], check=True,
                   capture_output=True)
    for name, text in before.items():
        assert (DATA / name).read_text() == text, f"{name} is not what the script writes"
    rows = [json.loads(l) for l in before["aligner_triples.jsonl"].splitlines()]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"unsafe", "improve", "identity"}
    assert all(r["answer"] == r["correction"] for r in rows if r["kind"] == "identity")
    from profanity_check import predict_prob

    # every correction target is clean; every "unsafe" original is profane
    assert max(predict_prob([r["correction"] for r in rows])) < 0.5
    assert min(predict_prob([r["answer"] for r in rows if r["kind"] == "unsafe"])) > 0.5
    assert len(load_triples(DATA / "aligner_triples_large.jsonl")) > len(rows)
