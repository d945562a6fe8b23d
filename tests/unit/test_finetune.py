"""finetune/: SafeDPO transform and loss, MoCAN relabelling, pair loading, CLI errors, and the
TRL trainer's offset (on a tiny random model: no real checkpoint needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fakes import finetune_cli as _cli

from finetune.mocan import (
    lambda_from_dual_file,
    lambda_from_rollouts,
    mocan_relabel,
    preference_probs,
    score_pairs,
)
from finetune.pairs import FIELDS, PairSchemaError, PreferencePair, load_pairs, split_pairs
from finetune.safedpo import safedpo_transform, safety_offsets, transform_pair

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = ROOT / "finetune" / "data" / "synthetic_safety.jsonl"


def pair(safe0: bool, safe1: bool, better: int, safer: int | None = None) -> PreferencePair:
    return PreferencePair("x?", ("answer zero", "answer one"), (safe0, safe1), better,
                          better if safer is None else safer)


def row(**over) -> dict:
    base = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
            "is_response_1_safe": False, "better_response_id": 0, "safer_response_id": 0}
    return {**base, **over}


# --- SafeDPO transform --------------------------------------------------------------------

def test_transform_keeps_when_the_better_answer_is_safe():
    ex = transform_pair(pair(True, False, better=0))
    assert (ex.chosen, ex.rejected, ex.h_chosen, ex.h_rejected, ex.action) == (
        "answer zero", "answer one", 0, 1, "keep")
    both_safe = transform_pair(pair(True, True, better=1))
    assert (both_safe.chosen, both_safe.h_rejected, both_safe.action) == ("answer one", 0, "keep")


def test_transform_swaps_when_only_the_better_answer_is_unsafe():
    ex = transform_pair(pair(True, False, better=1, safer=0))
    assert (ex.chosen, ex.rejected, ex.h_chosen, ex.h_rejected, ex.action) == (
        "answer zero", "answer one", 0, 1, "swap")


def test_transform_drops_pairs_with_two_unsafe_answers():
    assert transform_pair(pair(False, False, better=0)) is None
    examples, counts = safedpo_transform([pair(False, False, 0), pair(True, False, 1, 0),
                                          pair(True, False, 0), pair(True, True, 0)])
    assert counts == {"keep": 2, "swap": 1, "drop": 1, "unsafe_rejected": 2}
    assert [e.h_chosen for e in examples] == [0, 0, 0]  # after T the winner is always safe
    assert safety_offsets(examples, 10.0) == [10.0, 10.0, 0.0]


# --- losses -------------------------------------------------------------------------------

def _nll_sigmoid(z: float) -> float:
    return math.log1p(math.exp(-z))  # −log σ(z)


def test_safedpo_loss_matches_hand_values_with_and_without_delta():
    torch = pytest.importorskip("torch")
    from finetune.losses import dpo_loss, safedpo_loss

    pc, pr = torch.tensor([-10.0, -10.0]), torch.tensor([-12.0, -12.0])
    rc, rr = torch.tensor([-11.0, -11.0]), torch.tensor([-11.0, -11.0])
    hc, hr = torch.tensor([0, 0]), torch.tensor([0, 1])
    # margin = 0.1·((−10 + 11) − (−12 + 11)) = 0.2; the second pair has an unsafe loser: z = 0.2 − 10
    got = safedpo_loss(pc, pr, rc, rr, hc, hr, beta=0.1, delta=10.0)
    assert got.tolist() == pytest.approx([_nll_sigmoid(0.2), _nll_sigmoid(0.2 - 10.0)], rel=1e-5)
    assert got[1] > 9.7  # the offset demands a margin above Δ: far from satisfied yet
    assert dpo_loss(pc, pr, rc, rr, 0.1).tolist() == pytest.approx([_nll_sigmoid(0.2)] * 2,
                                                                    rel=1e-5)
    # Δ = 0 is DPO whatever the labels say
    assert safedpo_loss(pc, pr, rc, rr, hc, hr, 0.1, 0.0).tolist() == pytest.approx(
        [_nll_sigmoid(0.2)] * 2, rel=1e-5)


def test_the_swap_reverses_the_preference_the_loss_sees():
    torch = pytest.importorskip("torch")
    from finetune.losses import safedpo_loss

    # log π_θ − log π_ref per response: the safe answer ("answer zero") +1, the unsafe one −1
    lr = {"answer zero": 1.0, "answer one": -1.0}
    helpful_but_unsafe_first = pair(True, False, better=1, safer=0)
    ex = transform_pair(helpful_but_unsafe_first)
    t = lambda x: torch.tensor([x])  # noqa: E731
    loss = safedpo_loss(t(lr[ex.chosen]), t(lr[ex.rejected]), t(0.0), t(0.0), t(ex.h_chosen),
                        t(ex.h_rejected), beta=0.5, delta=1.0)
    # chosen = the safe answer: z = 0.5·(1 − (−1)) − (1 − 0)·1 = 0
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)
    # without the swap (DPO on the raw helpfulness label) the same policy is penalised
    raw = safedpo_loss(t(lr["answer one"]), t(lr["answer zero"]), t(0.0), t(0.0), t(0), t(0),
                       beta=0.5, delta=1.0)
    assert float(raw) == pytest.approx(_nll_sigmoid(-1.0), rel=1e-6)


def test_pair_stats_report_margins_without_the_offset():
    torch = pytest.importorskip("torch")
    from finetune.losses import pair_stats

    z = torch.zeros(2)
    stats = pair_stats(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0]), z, z,
                       torch.tensor([10.0, 0.0]), beta=1.0)
    assert stats["reward_margin"] == pytest.approx(0.0)
    assert stats["accuracy"] == 0.5 and stats["accuracy_unsafe_rejected"] == 1.0
    assert stats["loss"] == pytest.approx((_nll_sigmoid(1 - 10) + _nll_sigmoid(-1)) / 2, rel=1e-5)


def test_sequence_logps_sums_completion_tokens_only():
    torch = pytest.importorskip("torch")
    from finetune.losses import sequence_logps

    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))  # [1, 3, 2]
    ids = torch.tensor([[0, 1, 1]])
    got = sequence_logps(logits, ids, torch.tensor([[0, 1, 1]]))
    assert float(got) == pytest.approx(math.log(0.5) + math.log(0.1), rel=1e-6)


# --- MoCAN --------------------------------------------------------------------------------

def test_relabel_frequency_matches_bradley_terry_probability():
    n = 20_000
    pairs = [pair(True, False, 0)] * n
    r = np.tile([0.2, 0.9], (n, 1))
    c = np.tile([0.0, 0.5], (n, 1))
    examples, stats = mocan_relabel(pairs, r, c, lam=1.0, seed=7)
    expected = 1 / (1 + math.exp(-((0.9 - 0.5) - 0.2)))  # σ(w₁ − w₀), w = r − λ·cost
    share = sum(e.chosen == "answer one" for e in examples) / n
    assert abs(share - expected) < 0.015  # 4 standard errors
    assert stats["mean_p1"] == pytest.approx(expected)
    assert stats["labelled_1"] == pytest.approx(share)
    again, _ = mocan_relabel(pairs, r, c, lam=1.0, seed=7)
    assert again == examples  # seeded


def test_a_larger_lambda_moves_labels_towards_the_safer_answer():
    n = 5_000
    pairs = [pair(True, False, better=1, safer=0)] * n  # answer one: more reward, more cost
    r, c = np.tile([0.2, 0.9], (n, 1)), np.tile([0.0, 0.5], (n, 1))
    shares = [mocan_relabel(pairs, r, c, lam, seed=3)[1]["labelled_1"] for lam in (0.0, 1.0, 4.0)]
    assert shares[0] > 0.6 > shares[1] > 0.4 > shares[2]
    assert preference_probs(r[:1], c[:1], 4.0).item() == pytest.approx(
        1 / (1 + math.exp(1.3)))
    sharper = preference_probs(r[:1], c[:1], 0.0, temperature=0.1).item()
    assert sharper > 0.99  # τ < 1 sharpens the Bradley–Terry probability
    with pytest.raises(ValueError, match="temperature"):
        preference_probs(r, c, 0.0, temperature=0.0)


def test_score_pairs_uses_both_scorers():
    class Length:
        def score(self, prompt, responses):
            return [float(len(x)) for x in responses]

    class Bang:
        def score(self, prompt, responses):
            return [float("!" in x) for x in responses]

    p = PreferencePair("q", ("ok", "no way!"), (True, False), 0, 0)
    r, c = score_pairs([p], Length(), Bang(), progress=False)
    assert r.tolist() == [[2.0, 7.0]] and c.tolist() == [[0.0, 1.0]]


def _rollouts(folder: Path, rewards, costs) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({
        "model": "m", "prompts": "p.jsonl", "n": len(rewards[0]), "max_tokens": 8,
        "temperature": 1.0, "reward": "relevance", "cost": "profanity"}))
    with (folder / "rollouts.jsonl").open("w") as f:
        for i, (rs, cs) in enumerate(zip(rewards, costs)):
            for k, (rv, cv) in enumerate(zip(rs, cs)):
                f.write(json.dumps({"prompt_id": f"p{i}", "prompt": "q", "prompt_ids": [1],
                                    "sample": k, "token_ids": [2], "logprobs": [-1.0],
                                    "text": "t", "finish_reason": "stop", "reward": rv,
                                    "cost": cv}) + "\n")
    return folder


def test_lambda_from_rollouts_and_dual_file(tmp_path):
    from decoding.dual import InfeasibleConstraint, solve_dual

    r = [[1.0, 0.0, 0.5], [0.8, 0.1, 0.2]]
    c = [[0.9, 0.0, 0.4], [0.7, 0.1, 0.0]]
    folder = _rollouts(tmp_path / "ro", r, c)
    got = lambda_from_rollouts(folder, "relevance", "profanity", beta=0.5, threshold=-0.2)
    assert got.value == pytest.approx(solve_dual(np.array(r), -np.array(c), 0.5, -0.2))
    assert got.value > 0 and got.detail["prompts"] == 2 and got.detail["samples"] == 3
    with pytest.raises(InfeasibleConstraint):
        lambda_from_rollouts(folder, "relevance", "profanity", beta=0.5, threshold=0.5)
    dual = tmp_path / "dual.json"
    dual.write_text(json.dumps({"lambda": 2.5, "beta": 0.5, "threshold": -0.2,
                                "reward": "relevance", "cost": "profanity"}))
    assert lambda_from_dual_file(dual).value == 2.5


# --- loading ------------------------------------------------------------------------------

def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_pairs_validates_the_schema(tmp_path):
    good = load_pairs(_jsonl(tmp_path / "ok.jsonl", [row(), row(better_response_id=1)]))
    assert [p.better for p in good] == [0, 1] and good[0].safe == (True, False)
    bad = row()
    del bad["safer_response_id"]
    with pytest.raises(PairSchemaError, match=r"line 2: missing field\(s\) safer_response_id"):
        load_pairs(_jsonl(tmp_path / "missing.jsonl", [row(), bad]))
    with pytest.raises(PairSchemaError, match="better_response_id must be 0 or 1"):
        load_pairs(_jsonl(tmp_path / "id.jsonl", [row(better_response_id=2)]))
    with pytest.raises(PairSchemaError, match="is_response_1_safe must be a boolean"):
        load_pairs(_jsonl(tmp_path / "b.jsonl", [row(is_response_1_safe="yes")]))
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(PairSchemaError, match="line 1: not JSON"):
        load_pairs(tmp_path / "junk.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "absent.jsonl")


def test_load_pairs_from_local_datasets_folders(tmp_path):
    from datasets import Dataset

    rows = [row(), row(prompt="q", better_response_id=1)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert [p.prompt for p in load_pairs(tmp_path / "saved")] == ["p", "q"]
    (tmp_path / "files").mkdir()
    _jsonl(tmp_path / "files" / "train.jsonl", rows)
    assert [p.better for p in load_pairs(tmp_path / "files", split="train")] == [0, 1]
    Dataset.from_list([{k: v for k, v in row().items() if k != "prompt"}]).save_to_disk(
        str(tmp_path / "noprompt"))
    with pytest.raises(PairSchemaError, match="missing field.*prompt"):
        load_pairs(tmp_path / "noprompt")


def test_split_is_deterministic_and_disjoint():
    items = list(range(10))
    train, held = split_pairs(items, 0.2, seed=1)
    assert len(held) == 2 and sorted(train + held) == items
    assert split_pairs(items, 0.2, seed=1) == (train, held)
    assert split_pairs(items, 0.0, seed=1)[1] == []
    with pytest.raises(ValueError):
        split_pairs(items, 1.0, seed=1)


def test_synthetic_set_is_reproducible_and_exercises_every_branch():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_synthetic",
                                                  SYNTHETIC.with_name("make_synthetic.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert [json.loads(x) for x in SYNTHETIC.read_text().splitlines()] == mod.build()
    pairs = load_pairs(SYNTHETIC)
    assert 40 <= len(pairs) <= 80 and set(FIELDS) <= set(pairs[0].to_row())
    _, counts = safedpo_transform(pairs)
    assert counts["keep"] > 0 and counts["swap"] > 0 and counts["drop"] > 0


# --- CLI errors (no model is loaded: every check runs before) -----------------------------

@pytest.mark.parametrize("extra, message", [
    (["--beta", "0"], "--beta must be > 0"),
    (["--delta", "-1"], "--delta must be ≥ 0"),
    (["--steps", "0"], "--steps and --batch-size must be ≥ 1"),
    (["--held-out", "1"], "--held-out must lie in [0, 1)"),
    (["--full", "--save-adapter"], "--save-adapter needs LoRA"),
])
def test_cli_rejects_bad_safedpo_flags(extra, message, tmp_path, capsys):
    rc, err = _cli(["safedpo", "--data", str(SYNTHETIC), "--out", str(tmp_path / "o"), *extra],
                   capsys)
    assert rc == 2 and message in err and "Traceback" not in err


def test_cli_reports_data_and_model_errors(tmp_path, capsys):
    bad = row()
    del bad["better_response_id"]
    data = _jsonl(tmp_path / "bad.jsonl", [bad])
    rc, err = _cli(["safedpo", "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "missing field(s) better_response_id" in err
    rc, err = _cli(["safedpo", "--data", str(tmp_path / "none.jsonl"), "--out",
                    str(tmp_path / "o")], capsys)
    assert rc == 2 and "does not exist" in err
    rc, err = _cli(["safedpo", "--data", str(SYNTHETIC), "--out", str(tmp_path / "o"),
                    "--model", str(tmp_path)], capsys)
    assert rc == 2 and "no config.json" in err
    unsafe = _jsonl(tmp_path / "unsafe.jsonl", [row(is_response_0_safe=False)] * 3)
    rc, err = _cli(["safedpo", "--data", str(unsafe), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no training pairs left" in err and "'drop': 2" in err


def test_cli_mocan_needs_one_lambda_source(tmp_path, capsys):
    base = ["mocan", "--data", str(SYNTHETIC), "--out", str(tmp_path / "o")]
    assert _cli(base, capsys)[0] == 2  # argparse: one of --lambda --dual --rollouts
    assert _cli([*base, "--lambda", "1", "--dual", "x.json"], capsys)[0] == 2
    rc, err = _cli([*base, "--rollouts", str(tmp_path)], capsys)
    assert rc == 2 and "--rollouts needs --dual-beta and --threshold" in err
    rc, err = _cli([*base, "--lambda", "-1"], capsys)
    assert rc == 2 and "--lambda must be ≥ 0" in err
    (tmp_path / "dual.json").write_text('{"beta": 1}')
    rc, err = _cli([*base, "--dual", str(tmp_path / "dual.json")], capsys)
    assert rc == 2 and "missing keys: lambda" in err
    folder = _rollouts(tmp_path / "ro", [[0.0, 1.0]], [[0.0, 1.0]])
    rc, err = _cli([*base, "--rollouts", str(folder), "--dual-beta", "1", "--threshold", "1"],
                   capsys)
    assert rc == 1 and "infeasible" in err


def test_no_finetune_flag_lands_in_server_settings():
    """No finetune flag shares a name with a server Settings field (cli/ keeps them apart)."""
    import argparse

    from finetune.cli import add_arguments
    from server.settings import Settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    dests = {a.dest for p in sub.choices.values() for a in p._actions}
    assert not dests & set(Settings.model_fields)


# --- the TRL trainer's offset, on a tiny random Llama -------------------------------------

def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<pad>", "</s>"] + "x y z a b c safe rude hello ok no".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>",
                                   eos_token="</s>")
    return fast, len(words)


def test_safedpo_trainer_loss_equals_the_formula(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig

    from finetune.losses import safedpo_loss, sequence_logps
    from finetune.trainer import OFFSET, OffsetCollator, SafeDPOTrainer

    torch.manual_seed(0)
    tok, vocab = _tiny_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, pad_token_id=1, eos_token_id=2))
    ds = Dataset.from_list([
        {"prompt": "x y", "chosen": " safe ok", "rejected": " rude", OFFSET: 10.0},
        {"prompt": "a b c", "chosen": " hello", "rejected": " no no", OFFSET: 0.0}])
    trainer = SafeDPOTrainer(
        model=model, train_dataset=ds, processing_class=tok,
        args=DPOConfig(output_dir=str(tmp_path), beta=0.1, precompute_ref_log_probs=True,
                       max_steps=1, bf16=False, gradient_checkpointing=False, report_to=[],
                       use_cpu=True, per_device_train_batch_size=2),
        data_collator=OffsetCollator(pad_token_id=1))
    with torch.no_grad():  # move the policy away from the (precomputed) reference
        for p in trainer.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    got = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
        pc, pr = sequence_logps(logits, batch["input_ids"], batch["completion_mask"]).chunk(2)
    offset = batch[OFFSET]
    want = safedpo_loss(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                        torch.zeros(2), offset / 10.0, beta=0.1, delta=10.0).mean()
    got = float(got.detach())
    assert got == pytest.approx(float(want), rel=1e-4)
    assert got > 5  # the unsafe-loser pair carries the −Δ offset


# --- MoCAN: DPO's β tied to the dual's β (issue 11, item 7) ---------------------------------

def test_tied_beta_by_hand():
    from finetune.mocan import tied_beta

    # DPO on σ((w₁ − w₀)/τ) reaches p·exp(w/(τ·β)): CAN's π_λ* needs τ·β = β_dual
    assert tied_beta(0.5, 0.1, None) == (pytest.approx(5.0), "β_dual/τ", None)
    assert tied_beta(0.5, 1.0, None)[0] == 0.5
    assert tied_beta(0.5, 0.1, 5.0) == (5.0, "--beta", None)  # consistent: accepted
    with pytest.raises(ValueError, match=r"τ·β = 0.01 ≠ the dual's β 0.5"):
        tied_beta(0.5, 0.1, 0.1)
    value, source, warning = tied_beta(0.5, 0.1, 0.1, allow_mismatch=True)
    assert (value, source) == (0.1, "--beta (mismatch allowed)") and "≠" in warning
    assert tied_beta(None, 0.1, None) == (0.1, "default", None)  # --lambda: nothing to tie
    assert tied_beta(None, 0.1, 0.3) == (0.3, "--beta", None)


def test_cli_mocan_refuses_a_beta_the_dual_was_not_solved_for(tmp_path, capsys):
    import argparse

    from finetune.cli import add_arguments, resolve_beta, resolve_lambda

    dual = tmp_path / "dual.json"
    dual.write_text(json.dumps({"lambda": 2.5, "beta": 0.5, "threshold": -0.2,
                                "reward": "relevance", "cost": "profanity"}))
    base = ["mocan", "--data", str(SYNTHETIC), "--out", str(tmp_path / "o"), "--dual", str(dual),
            "--temperature", "0.1"]
    rc, err = _cli([*base, "--beta", "0.1"], capsys)
    assert rc == 2 and "≠ the dual's β 0.5" in err and "--allow-beta-mismatch" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(base)
    beta = resolve_beta(ns, resolve_lambda(ns))  # no --beta: tied to the dual file
    assert beta == {"value": pytest.approx(5.0), "source": "β_dual/τ", "beta_dual": 0.5,
                    "warning": None}
    ns = parser.parse_args([*base, "--beta", "0.1", "--allow-beta-mismatch"])
    assert resolve_beta(ns, resolve_lambda(ns))["warning"].startswith("--beta 0.1")
    ns = parser.parse_args(["safedpo", "--data", str(SYNTHETIC), "--out", str(tmp_path / "o")])
    assert resolve_beta(ns, None)["value"] == 0.1  # SafeDPO's default is unchanged
