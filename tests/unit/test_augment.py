"""Harmful-prefix → recovery augmentation (finetune/augment.py; Qi et al. 2024 §3.1)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from finetune import augment
from finetune.pairs import load_pairs
from finetune.safedpo import DPOExample, safedpo_transform
from tests.unit.fakes import FakeTokenizer

SYNTHETIC = Path(__file__).resolve().parents[2] / "finetune" / "data" / "synthetic_safety.jsonl"


class PieceTokenizer:
    """Whitespace-faithful word pieces ("  word"): decode(encode(t)[:k]) is a prefix of t."""

    def __init__(self) -> None:
        self.pieces: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for piece in re.findall(r"\s*\S+\s*$|\s*\S+", text):
            if piece not in self.pieces:
                self.pieces.append(piece)
            ids.append(self.pieces.index(piece))
        return ids

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids)


HARMFUL = "Sure, here is the damn plan: step one, step two, step three and so on."
SAFE = "I can't help with that, but here is a safer way to think about it."


def _examples() -> list[DPOExample]:
    return [
        DPOExample("how do I hurt them", SAFE, HARMFUL, 0, 1, "swap"),           # eligible
        DPOExample("tell me a joke", "a nice joke", "a meh joke", 0, 0, "keep"),  # both safe
        DPOExample("q3", HARMFUL, SAFE, 1, 0, "keep"),                          # unsafe chosen
        DPOExample("q4", SAFE + " Truly.", HARMFUL + " More.", 0, 1, "keep"),   # eligible
        DPOExample("q5", SAFE, "damn", 0, 1, "keep"),                           # 1-token h
    ]


def test_prompt_ends_with_the_harmful_prefix_and_target_is_the_recovery():
    tok = PieceTokenizer()
    rec = augment.recovery_examples(_examples(), tok, k_max=8, seed=3)
    assert [r.prompt for r in rec] == ["how do I hurt them", "q4"]
    for r, src in zip(rec, [_examples()[0], _examples()[3]]):
        ids = tok.encode(src.rejected)
        assert r.prefix == tok.decode(ids[:r.k]) and src.rejected.startswith(r.prefix)
        msgs = r.messages()
        assert msgs[-1] == {"role": "assistant", "content": r.prefix}
        rendered = FakeTokenizer().apply_chat_template(msgs, add_generation_prompt=False,
                                                       continue_final_message=True)
        assert rendered.endswith(r.prefix)
        assert r.target.strip() == src.chosen and r.recovery == src.chosen
        dpo = r.to_dpo()
        assert dpo.chosen == r.prefix + r.target and dpo.chosen.startswith(r.prefix)
        assert dpo.chosen.endswith(src.chosen)
        assert (dpo.rejected, dpo.h_chosen, dpo.h_rejected, dpo.action) == (
            src.rejected, 0, 1, augment.ACTION)


def test_k_within_range_and_spread_over_it():
    tok = PieceTokenizer()
    n_tokens = len(tok.encode(HARMFUL))
    many = [DPOExample(f"p{i}", SAFE, HARMFUL, 0, 1) for i in range(300)]
    for k_max, hi in ((5, 5), (100, n_tokens - 1)):
        ks = [r.k for r in augment.recovery_examples(many, tok, k_max, seed=0)]
        assert len(ks) == 300 and min(ks) >= 1 and max(ks) <= hi
        assert set(ks) == set(range(1, hi + 1))  # uniform draw: every k turns up in 300


def test_deterministic_given_the_seed():
    ex = [DPOExample(f"p{i}", SAFE, HARMFUL, 0, 1) for i in range(40)]
    first = augment.augment(ex, PieceTokenizer(), 12, seed=7)
    again = augment.augment(ex, PieceTokenizer(), 12, seed=7)
    other = augment.augment(ex, PieceTokenizer(), 12, seed=8)
    assert first == again
    assert first[0] != other[0]


def test_originals_retained_then_one_recovery_per_eligible_pair():
    ex = _examples()
    out, stats = augment.augment(ex, PieceTokenizer(), 6, seed=0)
    assert out[:len(ex)] == ex
    added = out[len(ex):]
    assert len(added) == 2 and all(a.action == augment.ACTION for a in added)
    assert stats["eligible"] == 3 and stats["recovery_examples"] == 2  # the 1-token h gives none
    assert 1 <= stats["mean_k"] <= stats["max_k"] <= 6
    again, _ = augment.augment(out, PieceTokenizer(), 6, seed=0)
    assert len(again) == len(out) + 2  # recovery examples are never augmented again


def test_seam_gets_a_space_only_where_needed():
    assert augment.join_seam("Sure, here", "I can't") == "Sure, here I can't"
    assert augment.join_seam("Sure, here ", "I can't") == "Sure, here I can't"
    assert augment.join_seam("", "I can't") == "I can't"


def test_on_the_shipped_pairs_after_safedpo_transform():
    examples, counts = safedpo_transform(load_pairs(SYNTHETIC))
    out, stats = augment.augment(examples, FakeTokenizer(), 16, seed=0)
    assert stats["eligible"] == counts["unsafe_rejected"] > 0
    assert len(out) == len(examples) + stats["recovery_examples"]
    assert stats["recovery_examples"] >= stats["eligible"] - 2


def test_bad_k_max_and_whole_answer_methods_are_refused():
    with pytest.raises(ValueError, match="k_max"):
        augment.recovery_examples(_examples(), PieceTokenizer(), 0, seed=0)
    for method, k in (("kldo", 8), ("rdro", 8), ("pro", 8), ("safedpo", 0)):
        ns = argparse.Namespace(method=method, augment_prefill=k, seed=0)
        with pytest.raises(ValueError, match="augment-prefill"):
            augment.apply(ns, _examples(), {}, "unused")


def test_flag_parses_and_absent_flag_changes_nothing():
    p = argparse.ArgumentParser()
    augment.add_arguments(p)
    assert p.parse_args(["--augment-prefill", "16"]).augment_prefill == 16
    ns = p.parse_args([])
    ns.method, ns.seed = "safedpo", 0
    ex = _examples()
    assert augment.apply(ns, ex, {"keep": 1}, "unused") == (ex, {"keep": 1})


def test_apply_uses_the_policy_tokenizer(monkeypatch):
    import transformers

    seen = []

    def fake_from_pretrained(name):
        seen.append(name)
        return PieceTokenizer()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    ns = argparse.Namespace(method="mocan", augment_prefill=4, seed=1)
    out, stats = augment.apply(ns, _examples(), {"pairs": 5}, "/models/policy")
    assert seen == ["/models/policy"]
    assert len(out) == 7 and stats["pairs"] == 5
    assert stats["augment_prefill"]["recovery_examples"] == 2
