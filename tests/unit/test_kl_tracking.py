"""KL(π_θ‖π_ref) tracked through fine-tuning (finetune/kl_track.py): the estimator and its t
interval by hand, unbiasedness against the exact KL of a toy unigram policy (end-of-turn included),
the talk's warnings at 15 and 100 nats, the hook's schedule, a LoRA policy at its start (KL 0),
and the report section. Seeded; no engine."""

from __future__ import annotations

import json
import math

import pytest
import torch

from finetune.kl_track import (
    INSPECT_NATS,
    USELESS_NATS,
    KLTrackConfig,
    KLTracker,
    held_out_prompts,
    kl_entry,
    kl_warning,
    markdown,
    write_kl_report,
)

EOS, PAD = 1, 0


class UnigramLM(torch.nn.Module):
    """A policy whose next-token law ignores the context: softmax(logits) at every position.
    `generate` samples it until EOS (then pads), as transformers' does."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, use_cache=False, **_):
        out = torch.log_softmax(self.logits, -1).expand(*input_ids.shape, -1)
        return type("Out", (), {"logits": out})()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, generation_config):
        k, steps = input_ids.shape[0], generation_config.max_new_tokens
        probs = torch.softmax(self.logits, -1)
        tokens = torch.multinomial(probs.expand(k, -1), steps, replacement=True)
        done = torch.zeros(k, dtype=torch.bool)
        for t in range(steps):
            tokens[done, t] = PAD
            done |= tokens[:, t] == EOS
        return torch.cat([input_ids, tokens], 1)


class FakeTokenizer:
    pad_token_id, eos_token_id, pad_token, eos_token = PAD, EOS, "<pad>", "</s>"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<u> " + messages[0]["content"] + " <a>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + len(w) % 3 for w in text.split()]}


def _tracker(every=5, prompts=4, samples=4, tokens=8, seed=0) -> KLTracker:
    t = KLTracker(KLTrackConfig(every, prompts, samples, tokens, seed),
                  [f"prompt number {i}" for i in range(6)], "", "held_out")
    t._tokenizer = FakeTokenizer()
    return t


def _kl(p_logits, q_logits) -> float:
    p, lp, lq = torch.softmax(p_logits, -1), torch.log_softmax(p_logits, -1), torch.log_softmax(
        q_logits, -1)
    return float((p * (lp - lq)).sum())


def test_entry_and_interval_by_hand():
    e = kl_entry(7, [[1.0, 2.0], [3.0, 4.0]], tokens=5.0)
    assert e["kl"] == pytest.approx(2.5) and e["answers"] == 4 and e["prompts"] == 2
    # t interval on the prompt means 1.5, 3.5: sd √2, se 1, t(0.975, 1 df) = 12.706
    assert e["ci95"] == pytest.approx([2.5 - 12.7062, 2.5 + 12.7062], abs=1e-3)
    assert e["step"] == 7 and e["warning"] is None
    assert kl_entry(1, [[0.5, 0.7]], 1.0)["ci95"] is None  # one prompt: no interval
    with pytest.raises(ValueError):
        kl_entry(1, [[]], 0.0)


def test_warnings_at_the_talks_thresholds():
    assert kl_warning(14.9) is None and kl_warning(INSPECT_NATS) is None
    assert "reward hacking" in kl_warning(15.1)
    assert "unlikely to be useful" in kl_warning(USELESS_NATS + 0.1)
    assert "unlikely to be useful" not in kl_warning(99.0)


def test_estimate_is_unbiased_on_a_toy_unigram_policy():
    torch.manual_seed(3)
    ref_logits = torch.randn(6)
    pol_logits = ref_logits + torch.tensor([0.0, 0.3, 1.5, -1.0, 0.5, 0.0])
    policy, reference = UnigramLM(pol_logits), UnigramLM(ref_logits).eval()
    tracker = _tracker(prompts=5, samples=200, tokens=4)
    entry = tracker.measure(10, policy, reference=reference)
    # exact KL of the first 4 tokens' law: per-token KL × expected positions before EOS
    p_eos = float(torch.softmax(pol_logits, -1)[EOS])
    exact = _kl(pol_logits, ref_logits) * sum((1 - p_eos) ** t for t in range(4))
    lo, hi = entry["ci95"]
    assert lo <= exact <= hi
    assert entry["kl"] == pytest.approx(exact, rel=0.1)
    assert entry["answers"] == 1000 and entry["prompts"] == 5
    assert 1 <= entry["tokens_mean"] <= 4
    # same seed and step: the same estimate; training's random stream is left alone
    state = torch.random.get_rng_state()
    again = _tracker(prompts=5, samples=200, tokens=4).measure(10, policy, reference=reference)
    assert again["kl"] == entry["kl"] and torch.equal(state, torch.random.get_rng_state())


def test_policy_equal_to_reference_reads_zero():
    logits = torch.randn(6, generator=torch.Generator().manual_seed(1))
    e = _tracker().measure(3, UnigramLM(logits), reference=UnigramLM(logits))
    assert e["kl"] == 0.0 and e["ci95"] == [0.0, 0.0]


def test_warnings_on_a_toy_policy_far_from_the_reference(caplog):
    ref_logits = torch.zeros(6)
    ref_logits[3] = -30.0  # the reference almost never says token 3
    hacked = torch.full((6,), -30.0)
    hacked[3] = 0.0        # the policy says nothing else: ~30 nats a token
    tracker = _tracker(tokens=1)
    one = tracker.measure(5, UnigramLM(hacked), reference=UnigramLM(ref_logits))
    assert INSPECT_NATS < one["kl"] < USELESS_NATS and "reward hacking" in one["warning"]
    five = _tracker(tokens=5).measure(10, UnigramLM(hacked), reference=UnigramLM(ref_logits))
    assert five["kl"] > USELESS_NATS and "unlikely to be useful" in five["warning"]
    assert "reward hacking" in caplog.text
    summary = tracker.summary()
    assert summary["warnings"] == [f"step 5: {one['warning']}"]
    assert summary["thresholds"] == {"inspect": 15.0, "useless": 100.0}


def test_hook_schedule_step_zero_every_k_and_the_last():
    policy = UnigramLM(torch.zeros(6))
    tracker = _tracker(every=2, samples=50, tokens=2)
    tracker.on_step(0, policy)          # full fine-tune: freezes a reference copy
    assert tracker.reference is not None and tracker.entries[0]["kl"] == 0.0
    for step in range(1, 6):
        with torch.no_grad():
            policy.logits[2] += 1.0     # training moves the policy
        tracker.on_step(step, policy, last=5)
    assert [e["step"] for e in tracker.entries] == [0, 2, 4, 5]
    kls = [e["kl"] for e in tracker.entries]
    assert kls[0] == 0.0 and kls[-1] > kls[1] > 0  # drifts away from the frozen start
    tracker.record_reference()                     # idempotent
    assert [e["step"] for e in tracker.entries] == [0, 2, 4, 5]
    off = _tracker(every=0)
    off.on_step(4, policy, last=4)
    assert off.entries == []


def test_lora_policy_at_its_start_reads_zero():
    pytest.importorskip("peft")
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, pad_token_id=PAD,
                                        eos_token_id=EOS))
    frozen = copy.deepcopy(base).eval()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    tracker = _tracker(samples=16, tokens=3)
    assert tracker.measure(1, model)["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=2.0)
    moved = tracker.measure(2, model)  # the adapter disabled is the reference
    merged = copy.deepcopy(model).merge_and_unload().eval()
    explicit = _tracker(samples=16, tokens=3).measure(2, merged, reference=frozen)
    assert moved["kl"] == pytest.approx(explicit["kl"], abs=1e-3)
    assert moved["kl"] > 0.05


def test_report_section_and_plot(tmp_path):
    tracker = _tracker(tokens=1)
    tracker.record_reference()
    ref_logits = torch.zeros(6)
    ref_logits[3] = -30.0
    hacked = torch.full((6,), -30.0)
    hacked[3] = 0.0
    tracker.measure(4, UnigramLM(hacked), reference=UnigramLM(ref_logits))
    kl = json.loads(json.dumps(tracker.summary()))  # JSON-safe for report.json
    (tmp_path / "report.md").write_text("# report\n")
    write_kl_report(tmp_path, kl, "toy")
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# report\n") and "## KL(π_θ‖π_ref) through training" in text
    assert "| 0 | 0.000 |" in text and "**warning**: step 4:" in text
    assert (tmp_path / "kl_curve.png").stat().st_size > 0
    assert markdown(kl).count("\n| ") == 3  # header + two steps


def test_prompts_come_from_the_held_out_split_first():
    class Ex:
        def __init__(self, prompt):
            self.prompt = prompt

    assert held_out_prompts([Ex("a"), Ex("b"), Ex("a")], [Ex("c")]) == (["a", "b"], "held_out")
    assert held_out_prompts([], [Ex("c")]) == (["c"], "train")
    assert math.isclose(USELESS_NATS, 100.0)


@pytest.mark.parametrize("mode", ["--lora", "--full"])
def test_trl_methods_track_every_k_steps(mode, tmp_path_factory, tmp_path):
    pytest.importorskip("peft")
    from test_finetune_methods import _tiny_model

    from finetune.cli import train_checkpoint

    tiny = _tiny_model(tmp_path_factory.mktemp("tiny"))
    report = train_checkpoint("safedpo", tmp_path / "ckpt", mode, "--model", str(tiny),
                              "--steps", "3", "--lr", "1e-2", "--limit", "24", "--max-length",
                              "32", "--kl-every", "2", "--kl-prompts", "2", "--kl-samples", "3",
                              "--kl-tokens", "4")
    entries = report["kl"]["entries"]
    assert [e["step"] for e in entries] == [0, 2, 3]  # the TRL callback: start, every 2, last
    assert entries[0]["kl"] == 0.0 and all(math.isfinite(e["kl"]) for e in entries)
    # the reference is the starting policy, not the trained one (with --full a reloaded copy)
    assert entries[1]["kl"] != 0.0 and entries[1]["ci95"] is not None
