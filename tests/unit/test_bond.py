"""finetune/bond*: the BoN distribution of rollouts, quantiles, BOND's loss terms by hand,
rollout grouping with fakes, flag errors, and the training loop on a tiny random Llama."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from fakes import finetune_cli as _cli

from finetune.bond import (
    BondGroup,
    bon_weights,
    data_stats,
    load_groups,
    log_quantile,
    split_groups,
)
from valuenet.data import Manifest, Rollout, append_rollouts, write_manifest

torch = pytest.importorskip("torch")


# --- the BoN distribution and the quantile ------------------------------------------------

def test_bon_weights_by_hand():
    # ranks 1, 3, 2 of K = 3: w = (rank/3)² − ((rank−1)/3)²
    assert bon_weights([0.1, 0.5, 0.3], 2) == pytest.approx([1 / 9, 5 / 9, 3 / 9])
    # a tie at the top: the level's mass 1 − (1/3)² is split evenly
    assert bon_weights([1.0, 1.0, 0.0], 2) == pytest.approx([4 / 9, 4 / 9, 1 / 9])
    assert bon_weights([3.0, 1.0, 2.0, 0.0], 1) == pytest.approx([0.25] * 4)  # n = 1: π_ref
    w = bon_weights([0.2, 0.9, 0.4, 0.7], 16)
    assert sum(w) == pytest.approx(1.0) and max(w) == w[1] and w[1] > 0.98
    with pytest.raises(ValueError):
        bon_weights([1.0], 0)


def test_bon_weights_match_simulated_best_of_n():
    """The weights are the law of "draw n of the K samples with replacement, keep the best,
    break ties uniformly"; a seeded simulation agrees to Monte Carlo precision."""
    rewards, n, trials = [0.3, 0.1, 0.3, 0.8, 0.5], 3, 60000
    rng = random.Random(0)
    counts = Counter()
    for _ in range(trials):
        draw = [rng.randrange(len(rewards)) for _ in range(n)]
        best = max(rewards[i] for i in draw)
        counts[rng.choice([i for i in draw if rewards[i] == best])] += 1
    for k, w in enumerate(bon_weights(rewards, n)):
        assert counts[k] / trials == pytest.approx(w, abs=0.01)


def test_log_quantile_is_vbons_smoothed_cdf():
    ref = [0.1, 0.2, 0.3]
    assert log_quantile(0.25, ref) == pytest.approx(math.log(3 / 4))
    assert log_quantile(0.0, ref) == pytest.approx(math.log(1 / 4))   # never −∞
    assert log_quantile(0.9, ref) == pytest.approx(0.0)
    assert log_quantile(0.2, ref) == pytest.approx(math.log(2 / 4))   # strict rank, as vBoN's


# --- BOND's loss terms by hand ------------------------------------------------------------

def test_forward_loss_by_hand():
    from finetune.bond_losses import bond_forward_loss

    logps = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -0.5, -3.0]])
    w = torch.tensor([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    want = [-(0.2 * -1 + 0.3 * -2 + 0.5 * -4), 0.5]
    assert bond_forward_loss(logps, w).tolist() == pytest.approx(want)


def test_backward_cost_kl_and_surrogate_gradient_by_hand():
    from finetune.bond_losses import backward_cost, backward_kl_estimate, bond_backward_loss

    pol = torch.tensor([-3.0, -5.0, -4.0], requires_grad=True)
    ref = torch.tensor([-3.5, -4.0, -4.0])
    logq = torch.tensor([math.log(0.5), math.log(0.9), math.log(0.25)])
    n = 4
    c = [(-3 + 3.5) - 3 * math.log(0.5), (-5 + 4) - 3 * math.log(0.9),
         0 - 3 * math.log(0.25)]
    assert backward_cost(pol, ref, logq, n).tolist() == pytest.approx(c)
    assert backward_kl_estimate(pol, ref, logq, n) == pytest.approx(sum(c) / 3 - math.log(4))
    loss = bond_backward_loss(pol, ref, logq, n)
    loo = [(sum(c) - ci) / 2 for ci in c]  # leave-one-out baseline: the other samples' mean
    assert loss.tolist() == pytest.approx([(ci - b) * p for ci, b, p in zip(c, loo, [-3, -5, -4])])
    loss.sum().backward()  # REINFORCE: ∇ = (c_i − b_i)·∇log π, c held constant
    assert pol.grad.tolist() == pytest.approx([ci - b for ci, b in zip(c, loo)])


def test_jeffreys_mixes_the_two_terms():
    from finetune.bond_losses import jeffreys_loss

    assert jeffreys_loss(2.0, 10.0, 0.25) == pytest.approx(0.75 * 2 + 0.25 * 10)
    assert jeffreys_loss(2.0, 10.0, 0.0) == 2.0 and jeffreys_loss(2.0, 10.0, 1.0) == 10.0


# --- rollouts → groups (fakes) ------------------------------------------------------------

def _folder(tmp_path, rewards_by_prompt: dict[str, list], max_tokens=4):
    folder = tmp_path / "ro"
    k = max(len(v) for v in rewards_by_prompt.values())
    write_manifest(folder, Manifest(model="fake", prompts="p.jsonl", n=k, max_tokens=max_tokens,
                                    temperature=1.0, reward="length",
                                    extra={"model_path": str(tmp_path / "model")}))
    for pid, rewards in rewards_by_prompt.items():
        rows = [Rollout(prompt_id=pid, prompt=f"q {pid}", prompt_ids=[5, 6], sample=j,
                        token_ids=[7 + j, 2], logprobs=[-1.0, -0.5], text=f"a{j}",
                        finish_reason="stop", reward=r)
                for j, r in enumerate(rewards)]
        append_rollouts(folder, list(reversed(rows)))  # file order must not matter
    return folder


def test_load_groups_sorts_samples_and_drops_single_sample_prompts(tmp_path):
    folder = _folder(tmp_path, {"a": [0.1, 0.9, 0.5], "b": [0.3], "c": [1.0, 2.0]})
    manifest, groups = load_groups(folder)
    assert manifest["reward"] == "length" and [g.prompt_id for g in groups] == ["a", "c"]
    a = groups[0]
    assert a.rewards == [0.1, 0.9, 0.5] and a.samples[1] == [8, 2]
    assert a.prompt_ids == [5, 6] and a.ref_logps == [-1.5] * 3
    stats = data_stats(groups, 2)
    assert stats["prompts"] == 2 and stats["mean_reward_ref"] == pytest.approx((0.5 + 1.5) / 2)
    bo2_a = sum(w * r for w, r in zip(bon_weights(a.rewards, 2), a.rewards))
    assert stats["mean_reward_bo2"] == pytest.approx((bo2_a + (0.25 * 1 + 0.75 * 2)) / 2)


def test_load_groups_refuses_missing_rewards_and_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="no finite reward"):
        load_groups(_folder(tmp_path, {"a": [0.1, None]}))
    with pytest.raises(ValueError, match="≥ 2 scored samples"):
        load_groups(_folder(tmp_path / "x", {"a": [0.1]}))
    with pytest.raises(FileNotFoundError):
        load_groups(tmp_path / "nothing")


def test_split_groups_is_seeded_and_keeps_a_training_prompt():
    groups = [BondGroup(str(i), "q", [1], [[2], [3]], [0.0, 1.0], [-1.0, -1.0])
              for i in range(10)]
    train, held = split_groups(groups, 0.3, seed=1)
    assert len(held) == 3 and len(train) == 7
    assert split_groups(groups, 0.3, seed=1) == (train, held)
    assert {g.prompt_id for g in train} | {g.prompt_id for g in held} == set(map(str, range(10)))
    assert len(split_groups(groups[:1], 0.9, seed=0)[0]) == 1


# --- CLI errors (one line, before any model is loaded) ------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--n", "1"], "--n must be ≥ 2"),
    (["--jeffreys-beta", "1.5"], "--jeffreys-beta must lie in [0, 1]"),
    (["--steps", "0"], "must be ≥ 1"),
    (["--held-out", "1"], "--held-out must lie in [0, 1)"),
    (["--full", "--save-adapter"], "--save-adapter needs LoRA"),
])
def test_cli_rejects_bad_bond_flags(extra, message, tmp_path, capsys):
    folder = _folder(tmp_path, {"a": [0.1, 0.2]})
    rc, err = _cli(["bond", "--rollouts", str(folder), "--out", str(tmp_path / "o"), *extra],
                   capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_rejects_a_folder_without_rollouts(tmp_path, capsys):
    rc, err = _cli(["vbon", "--rollouts", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "not a rollout folder" in err and len(err.strip().splitlines()) == 1


# --- the loop on a tiny random Llama -----------------------------------------------------

class CountScorer:
    """Reward = number of 'safe' tokens in the answer."""

    def score(self, prompt, responses):
        return [float(r.split().count("safe")) for r in responses]


def _tiny_model_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "<pad>", "</s>"] + "x y z a b safe rude ok".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>",
                                   eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         pad_token_id=1, eos_token_id=2, bos_token_id=2))
    out = tmp_path / "tiny"
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def test_train_bond_on_a_tiny_llama_saves_a_merged_checkpoint(tmp_path):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from finetune.bond_trainer import BondConfig, train_bond

    model_dir = _tiny_model_dir(tmp_path)
    safe, rude = 8, 9
    groups = [BondGroup(str(i), "x y", [3, 4], [[safe, safe, 2], [rude, 2], [safe, rude, 2]],
                        [2.0, 0.0, 1.0], [-3.0, -2.0, -3.0]) for i in range(3)]
    cfg = BondConfig(model=model_dir, out=tmp_path / "ckpt", reward="count", n=2,
                     jeffreys_beta=0.5, steps=3, lr=1e-2, batch_prompts=2, policy_samples=2,
                     max_new_tokens=4, lora_r=4, lora_alpha=8)
    result = train_bond(cfg, groups[:2], groups[2:], CountScorer())
    assert [s for s, _ in result.loss_curve] == [1, 2, 3]
    assert all("kl_bwd" in e and "reward" in e for e in result.log)
    assert result.after["train"]["loss"] < result.before["train"]["loss"]  # lr 1e-2: moves
    assert set(result.after) == {"train", "held_out"}
    weights = load_file(str(cfg.out / "model.safetensors"))
    assert weights and not any("lora" in k for k in weights)
    assert (cfg.out / "tokenizer.json").is_file()


def test_backward_baseline_is_leave_one_out_within_each_prompt():
    """Issue 26 item 10: each sample's baseline is the mean cost of its prompt's other samples
    (independent of the sample itself); a prompt with one sample gets none."""
    from finetune.bond_losses import bond_backward_loss, leave_one_out_baseline

    cost = torch.tensor([1.0, 3.0, 10.0, 20.0, 40.0, 7.0])
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    assert leave_one_out_baseline(cost, groups).tolist() == pytest.approx(
        [3.0, 1.0, 30.0, 25.0, 15.0, 0.0])
    pol = torch.zeros(6, requires_grad=True)
    ref = -cost  # c = log π_θ − log π_ref − (n − 1)·log q = cost with q = 1
    bond_backward_loss(pol, ref, torch.zeros(6), 4, groups).sum().backward()
    assert pol.grad.tolist() == pytest.approx([-2.0, 2.0, -20.0, -5.0, 25.0, 7.0])


def test_bond_log_probs_are_of_the_tempered_policy():
    """Issue 26 item 10: with rollouts at temperature T, log π_θ is of softmax(logits / T), the
    law the rollouts (and the backward term's samples) were drawn from."""
    from finetune.bond_trainer import answer_logps

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([2.0, 0.0, -1.0, 0.5]))

        def forward(self, input_ids, attention_mask, use_cache):
            return type("Out", (), {"logits": self.w.expand(*input_ids.shape, 4)})()

    model = Toy()
    for t in (1.0, 0.5, 2.0):
        got = answer_logps(model, [[0]], [[1, 3]], 0, 16, t)
        logp = torch.log_softmax(model.w.detach() / t, -1)
        assert float(got[0]) == pytest.approx(float(logp[1] + logp[3]), rel=1e-6)
