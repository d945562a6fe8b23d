"""KLDO and PRO (finetune/losses.py, feedback.py, methods.py, loop.py): each loss against its
formula by hand, the feedback built from the pairs, the CLI's flag errors, and the explicit
loop end to end on a tiny random Llama (no real checkpoint needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fakes import finetune_cli as _cli

from finetune import feedback
from finetune.pairs import PreferencePair, load_pairs

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = ROOT / "finetune" / "data" / "synthetic_safety.jsonl"


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def _kl_half(d: float) -> float:
    """KL(B(½) ‖ B(σ(d))) from its definition: ½·log(½/q) + ½·log(½/(1 − q)), q = σ(d)."""
    q = 1 / (1 + math.exp(-d))
    return 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))


# --- KLDO -----------------------------------------------------------------------------------

def test_kldo_loss_matches_hand_values():
    from finetune.losses import kldo_loss

    # r = β·(policy − ref) with β = 0.5: aligned r = [1, 2], unaligned r = [0, −1, 1]
    got = kldo_loss(_t(-8, -6), _t(-10, -10), _t(-5, -7, -3), _t(-5, -5, -5), beta=0.5)
    want = -(1 + 2) / 2 + math.log((math.exp(0) + math.exp(-1) + math.exp(1)) / 3)
    assert float(got) == pytest.approx(want, rel=1e-12)
    zero = kldo_loss(_t(-3.0), _t(-3.0), _t(-4.0), _t(-4.0), beta=0.1)
    assert float(zero) == 0.0  # at the reference: no divergence estimated yet


def test_kldo_moving_average_changes_the_gradient_not_the_value():
    from finetune.losses import log_mean_exp

    t = _t(0.0, math.log(3.0)).requires_grad_()
    plain = log_mean_exp(t)
    plain.backward()
    assert float(plain.detach()) == pytest.approx(math.log(2.0))  # mean(1, 3) = 2
    assert t.grad.tolist() == pytest.approx([1 / 4, 3 / 4])  # softmax(t)
    t.grad = None
    corrected = log_mean_exp(t, running_mean=4.0)
    corrected.backward()
    assert float(corrected.detach()) == pytest.approx(math.log(2.0))
    assert t.grad.tolist() == pytest.approx([1 / (2 * 4), 3 / (2 * 4)])  # exp(t_i)/(n·EMA)


# --- PRO ------------------------------------------------------------------------------------

def test_bernoulli_half_kl_matches_its_definition():
    from finetune.losses import bernoulli_half_kl

    for d in (-3.0, -0.2, 0.0, 0.7, 5.0):
        assert float(bernoulli_half_kl(_t(d))) == pytest.approx(_kl_half(d), abs=1e-12)


def test_pro_pairwise_without_the_restored_terms_is_dpo():
    from finetune.losses import bernoulli_half_kl, dpo_loss

    pc, pr, rc, rr = _t(-10, -4), _t(-12, -3), _t(-11, -4), _t(-11, -5)
    d = 0.1 * ((pc - rc) - (pr - rr))
    decomposed = -0.5 * d + bernoulli_half_kl(d)  # optimiser + DPO's (sample) regulariser
    assert (decomposed + math.log(2)).tolist() == pytest.approx(
        dpo_loss(pc, pr, rc, rr, 0.1).tolist(), abs=1e-12)


def test_pro_pairwise_loss_matches_hand_values():
    from finetune.losses import pro_pairwise_loss

    beta, alpha = 0.5, 2.0
    pc, pr, rc, rr = -9.0, -13.0, -10.0, -12.0  # r_w = 0.5, r_l = −0.5
    r_w, r_l = beta * (pc - rc), beta * (pr - rr)
    outside = math.log(1 - math.exp(pc) - math.exp(pr))
    outside_ref = math.log(1 - math.exp(rc) - math.exp(rr))
    r_bar = beta * (outside - outside_ref)  # ≈ −3.8e-5: the hyper-response barely moves
    want = -0.5 * (r_w - r_l) + alpha * (_kl_half(r_w - r_l) + _kl_half(r_w - r_bar)
                                         + _kl_half(r_l - r_bar))
    got = pro_pairwise_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta, alpha)
    assert float(got) == pytest.approx(want, rel=1e-10)


def test_hyper_response_reward_by_hand_and_for_long_answers():
    from finetune.losses import hyper_response_reward

    got = hyper_response_reward(_t(math.log(0.5), math.log(0.25)).view(1, 2),
                                _t(math.log(0.25), math.log(0.25)).view(1, 2), beta=2.0)
    assert float(got) == pytest.approx(2.0 * (math.log(0.25) - math.log(0.5)))
    long = hyper_response_reward(_t(-80.0).view(1, 1), _t(-90.0).view(1, 1), beta=1.0)
    assert float(long) == pytest.approx(0.0, abs=1e-30) and math.isfinite(float(long))


def test_pro_unpaired_loss_matches_hand_values_and_its_minimiser():
    from finetune.losses import pro_unpaired_loss

    beta, alpha = 1.0, 2.0
    policy, ref, s = _t(-20.0, -21.0, -19.0), _t(-21.0, -20.0, -19.0), _t(0.5, -0.5, 0.25)
    want = [-si * (p - r) + alpha * _kl_half(p - r)  # r̄ ≈ 0 at these lengths (e^−20)
            for p, r, si in zip(policy.tolist(), ref.tolist(), s.tolist())]
    assert pro_unpaired_loss(policy, ref, s, beta, alpha).tolist() == pytest.approx(want, rel=1e-7)
    # the minimiser in r solves σ(r) = ½ + s/α: r* = logit(¾) = log 3 for s = ½, α = 2
    r = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([r], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = pro_unpaired_loss(-30.0 + r, _t(-30.0), _t(0.5), 1.0, 2.0).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert float(r.detach()) == pytest.approx(math.log(3.0), abs=1e-4)


# --- feedback from the pairs ----------------------------------------------------------------

def _pair(prompt, a, b, safe_a, safe_b, better) -> PreferencePair:
    return PreferencePair(prompt, (a, b), (safe_a, safe_b), better, better)


def test_scores_are_win_rates_under_safedpos_order():
    pairs = [_pair("q", "good", "rude", True, False, 1),    # safe beats unsafe, whatever better says
             _pair("q", "good", "curt", True, True, 0),     # both safe: the better one
             _pair("q", "curt", "rude", True, False, 1),
             _pair("q", "rude", "worse", False, False, 0)]  # both unsafe: a tie
    s = {c.text: c.score for c in feedback.scores(pairs)}
    assert s == {"good": 0.5, "curt": 0.0, "rude": pytest.approx((0 + 0 + 0.5) / 3 - 0.5),
                 "worse": 0.0}
    binary = {c.text: c.score for c in feedback.binary_feedback(pairs)}
    assert binary == {"good": 0.5, "rude": -0.5, "worse": -0.5}  # curt (s = 0) left out
    assert {c.text: c.score for c in feedback.kldo_sets(pairs)} == {
        "good": 1.0, "rude": -1.0, "worse": -1.0}


def test_feedback_on_the_shipped_pairs():
    pairs = load_pairs(SYNTHETIC)
    cr = feedback.kldo_sets(pairs)
    aligned = [c for c in cr if c.score > 0]
    assert aligned and all(c.safe for c in aligned)
    assert all(not c.safe for c in cr if c.score < 0)
    assert not any(c.text in {"I'm not sure.", "Sorry, I can't say."} for c in aligned)
    refusals = [c for c in aligned if c.text.startswith(("I can't help", "I won't"))]
    assert refusals  # safe redirections of adversarial prompts are D⁺
    scalar = feedback.scores(pairs)
    assert all(-0.5 <= c.score <= 0.5 for c in scalar)
    assert len({(c.prompt, c.text) for c in scalar}) == len(scalar)


# --- CLI flags (no model is loaded: every check runs before) --------------------------------

@pytest.mark.parametrize("argv, message", [
    (["kldo", "--ema-rate", "1.5"], "--ema-rate must lie in [0, 1]"),
    (["kldo", "--beta", "-1"], "--beta must be > 0"),
    (["pro", "--feedback", "pairwise", "--alpha", "0"], "--alpha must be > 0"),
    (["pro", "--feedback", "binary", "--alpha", "1"], "--alpha must be > 1 with --feedback binary"),
    (["pro", "--feedback", "scalar", "--batch-size", "0"], "--steps and --batch-size must be ≥ 1"),
])
def test_cli_rejects_bad_kldo_and_pro_flags(argv, message, tmp_path, capsys):
    rc, err = _cli([*argv, "--data", str(SYNTHETIC), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_pro_needs_a_feedback_type(tmp_path, capsys):
    rc, err = _cli(["pro", "--data", str(SYNTHETIC), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--feedback" in err
    rc, err = _cli(["pro", "--feedback", "ranked", "--data", str(SYNTHETIC), "--out",
                    str(tmp_path / "o")], capsys)
    assert rc == 2 and "invalid choice: 'ranked'" in err


def test_cli_kldo_needs_both_sets(tmp_path, capsys):
    rows = [{"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
             "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 0}] * 3
    data = tmp_path / "safe.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, err = _cli(["kldo", "--data", str(data), "--out", str(tmp_path / "o"), "--held-out", "0",
                    "--model", str(tmp_path / "nowhere")], capsys)
    assert rc == 2 and "kldo needs aligned and unaligned completions" in err


# --- the loop end to end on a tiny random Llama ---------------------------------------------

def _tiny_model(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "<pad>", "</s>", "<u>", "<a>", "how", "do", "i"] + sorted({
        w for line in SYNTHETIC.read_text().splitlines()
        for w in json.loads(line)["prompt"].lower().split()})[:40]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>",
                                   eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}<u> {{ m.content }}"
                          "{% else %} <a> {{ m.content }} </s>{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %} <a>{% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         pad_token_id=1, eos_token_id=2))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    pytest.importorskip("peft")
    return _tiny_model(tmp_path_factory.mktemp("tiny"))


def test_encode_scores_only_the_answer(tiny):
    from transformers import AutoTokenizer

    from finetune.loop import encode

    tok = AutoTokenizer.from_pretrained(tiny)
    enc = encode(tok, "how do i", "how", max_length=32)
    assert tok.convert_ids_to_tokens(enc.ids[:enc.prompt_len])[-1] == "<a>"
    assert tok.convert_ids_to_tokens(enc.ids[enc.prompt_len:]) == ["how", "</s>"]
    assert len(encode(tok, "how do i " * 20, "how " * 20, max_length=16).ids) == 16


@pytest.mark.parametrize("method, flags", [
    ("kldo", ()), ("pro", ("--feedback", "pairwise")), ("pro", ("--feedback", "binary")),
    ("pro", ("--feedback", "scalar")),
])
def test_loop_trains_and_saves_a_merged_checkpoint(method, flags, tiny, tmp_path):
    from finetune.cli import train_checkpoint

    out = tmp_path / "ckpt"
    report = train_checkpoint(method, out, *flags, "--model", str(tiny), "--steps", "3",
                              "--lr", "1e-2", "--limit", "24", "--max-length", "32")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    for name in ("report.json", "report.md", "loss_curve.png"):
        assert (out / name).stat().st_size > 0
    before, after = report["before"]["train"], report["after"]["train"]
    assert before["reward_margin"] == 0.0 and before["accuracy"] == 0.0 or method == "pro"
    assert len(report["loss_curve"]) == 3 and report["steps_per_s"] > 0
    assert after["loss"] != before["loss"]
    if method == "kldo":
        assert before["loss"] == 0.0 and "kl_estimate" in after
        assert report["config"]["ema_rate"] == 0.1 and report["config"]["batch_size"] == 8
    else:
        assert report["config"]["feedback"] == flags[1]


# --- issue 26 items 11–13: KLDO normalize, PRO "reconstructed", SafeDPO both-unsafe -------------

def test_kldo_normalize_scales_the_unaligned_term_as_the_reference_trainer():
    """rhaldarpurdue/KLDO KLTrainer, normalize: true: u ← u·min(a, u)/(u + 1e-9), the factor a
    constant. Value −a + min(a, u); gradient of u scaled by the same factor."""
    from finetune.losses import kldo_loss

    pa, ra = _t(-8, -6), _t(-10, -10)  # β = 0.5: aligned r = [1, 2], a = 1.5
    pu = torch.tensor([-1.0, -3.0, 1.0], dtype=torch.float64, requires_grad=True)
    ru = _t(-5, -5, -5)  # unaligned r = [2, 1, 3]: u = log mean exp > a
    u = math.log((math.exp(2) + math.exp(1) + math.exp(3)) / 3)
    loss = kldo_loss(pa, ra, pu, ru, beta=0.5, normalize=True)
    assert float(loss.detach()) == pytest.approx(-1.5 + 1.5, abs=1e-8)  # u capped at a
    loss.backward()
    w = torch.softmax(0.5 * (pu.detach() - ru), 0) * 0.5
    assert pu.grad.tolist() == pytest.approx((w * 1.5 / (u + 1e-9)).tolist())
    # u ≤ a: unchanged (factor u/u = 1)
    small = kldo_loss(pa, ra, _t(-5, -7, -5), ru, beta=0.5, normalize=True)
    assert float(small) == pytest.approx(float(kldo_loss(pa, ra, _t(-5, -7, -5), ru, beta=0.5)),
                                         rel=1e-6)


def test_kldo_objective_normalizes_by_default_and_restarts_the_ema_each_epoch():
    import random

    from finetune.feedback import Completion
    from finetune.methods import kldo_objective

    comps = [Completion("p", f"a{i}", 1.0, True) for i in range(4)] + [
        Completion("p", f"u{i}", -1.0, False) for i in range(4)]
    obj = kldo_objective(comps, 0.5, 0.1)  # normalize is the default
    rng = random.Random(0)
    lp = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    idx = obj.sample(rng, 4)
    # step 0 (π_θ = π_ref): u = 0, so the normalised unaligned term is 0 (the reference's quirk)
    loss = obj.loss(torch.cat([lp[:2] + 1.0, lp[2:]]), torch.zeros(4, dtype=torch.float64))
    loss.backward()
    assert lp.grad[2:].abs().max() == 0 and len(idx) == 4
    plain = kldo_objective(comps, 0.5, 0.1, normalize=False)
    plain.sample(rng, 4)
    lp2 = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    plain.loss(torch.cat([lp2[:2] + 1.0, lp2[2:]]), torch.zeros(4, dtype=torch.float64)).backward()
    assert lp2.grad[2:].abs().min() > 0
    # the EMA restarts after a pass over the 8 completions (2 steps of 4): epoch 2's first
    # step has the gradient of a fresh objective's first step, although earlier batches moved it
    zeros = torch.zeros(4, dtype=torch.float64)

    def first_grad(obj, warm_steps):
        for _ in range(warm_steps):
            obj.sample(rng, 4)
            obj.loss(torch.full((4,), 3.0, dtype=torch.float64), zeros)
        obj.sample(rng, 4)
        x = torch.full((4,), 1.0, dtype=torch.float64, requires_grad=True)
        obj.loss(x, zeros).backward()
        return x.grad.tolist()

    fresh = first_grad(kldo_objective(comps, 0.5, 0.5, normalize=False), 0)
    assert first_grad(kldo_objective(comps, 0.5, 0.5, normalize=False), 2) == pytest.approx(fresh)
    assert first_grad(kldo_objective(comps, 0.5, 0.5, normalize=False), 1) != pytest.approx(fresh)


def test_pro_and_kldo_reports_say_what_they_are():
    from finetune.report import METHOD_NOTES, STAT_ROWS, _markdown

    assert "RECONSTRUCTED" in METHOD_NOTES["pro"] and "full regulariser" not in \
        METHOD_NOTES["pro"].replace("not the paper's full regulariser", "")
    assert dict(STAT_ROWS)["kl_estimate"].startswith("Donsker–Varadhan lower bound")
    stats = {"loss": 0.1, "pairs": 2}
    report = {"method": "pro (binary)", "config": {"model": "m", "beta": 0.1}, "output": "o",
              "output_kind": "merged safetensors", "data": {"source": "s", "pairs": 2},
              "steps": 1, "steps_per_s": 1.0, "train_s": 1.0, "trainable_params": 1,
              "before": {"train": stats}, "after": {"train": stats}}
    assert "RECONSTRUCTED" in _markdown(report)


def test_safedpo_both_unsafe_pairs_follow_the_flag():
    from finetune.safedpo import safedpo_transform, safety_offsets, transform_pair

    both = PreferencePair("p", ("a", "b"), (False, False), better=1, safer=0)
    assert transform_pair(both) is None  # default: dropped
    kept = transform_pair(both, "keep")
    assert (kept.chosen, kept.rejected, kept.h_chosen, kept.h_rejected, kept.action) == (
        "b", "a", 1, 1, "keep_unsafe")
    assert safety_offsets([kept], 10.0) == [0.0]  # plain DPO on the pair
    examples, counts = safedpo_transform([both], "keep")
    assert len(examples) == 1 and counts["keep_unsafe"] == 1 and counts["drop"] == 0
    with pytest.raises(ValueError, match="both_unsafe"):
        transform_pair(both, "swap")
