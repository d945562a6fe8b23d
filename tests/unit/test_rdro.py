"""RDRO (finetune/rdro.py): the loss against hand-computed numbers, its optimum on a discrete toy
policy (π_ref·r*_α), its bound 1/α where DDRO's unbounded ratio runs away, the objective's batch
layout, and the CLI's flags. Seeded and deterministic: population losses, no sampling."""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import pytest
import torch

from finetune.feedback import Completion
from finetune.rdro import ddro_loss, rdro_loss, rdro_objective, rdro_stats, relative_ratio

LOG2, LOG3 = math.log(2), math.log(3)


def test_loss_at_the_reference_is_two_log_two_for_every_alpha():
    zeros = torch.zeros(3)
    for alpha in (0.0, 0.1, 0.5, 0.9):
        assert float(rdro_loss(zeros, zeros, zeros[:2], zeros[:2], alpha)) == pytest.approx(
            2 * LOG2)


def test_loss_against_hand_computed_numbers():
    # u⁺ = log 2: −log σ(log 2) = log 1.5, −log σ(−log 2) = log 3; u⁻ = 0: −log σ(0) = log 2
    lp_pos, ref_pos = torch.tensor([math.log(0.2)]), torch.tensor([math.log(0.1)])
    lp_neg, ref_neg = torch.tensor([-3.0]), torch.tensor([-3.0])
    alpha = 0.5
    expected = math.log(1.5) + alpha * LOG3 + (1 - alpha) * LOG2  # 1.3013…
    assert float(rdro_loss(lp_pos, ref_pos, lp_neg, ref_neg, alpha)) == pytest.approx(
        expected, abs=1e-6)
    assert expected == pytest.approx(1.301345, abs=1e-6)
    # β scales the log-ratio: β = 2 on log-ratio ½·log 2 is the same u
    assert float(rdro_loss(lp_pos / 2 + ref_pos / 2, ref_pos, lp_neg, ref_neg, alpha,
                           beta=2.0)) == pytest.approx(expected, abs=1e-6)
    # DDRO (α = 0): log 1.5 + log 2; means over several answers
    assert float(ddro_loss(lp_pos, ref_pos, lp_neg, ref_neg)) == pytest.approx(
        math.log(1.5) + LOG2, abs=1e-6)
    two = torch.tensor([math.log(2), 0.0])
    assert float(rdro_loss(two, torch.zeros(2), torch.zeros(1), torch.zeros(1), 0.25)) == \
        pytest.approx((math.log(1.5) + 0.25 * LOG3 + LOG2 + 0.25 * LOG2) / 2 + 0.75 * LOG2,
                      abs=1e-6)


def test_relative_ratio_is_bounded_by_one_over_alpha():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.0, 0.3, 0.2, 0.5])
    r = relative_ratio(p, q, 0.25)
    assert r.tolist() == pytest.approx([4.0, 1.0, 1.0, 0.0])
    assert float(r.max()) <= 1 / 0.25


def _population_loss(u, p_plus, p_minus, alpha):
    """RDRO's loss with exact expectations over a discrete answer space (weights, not means)."""
    import torch.nn.functional as F

    pos = -F.logsigmoid(u) - alpha * F.logsigmoid(-u)
    return (p_plus * pos).sum() + (1 - alpha) * (p_minus * -F.logsigmoid(-u)).sum()


def _fit(ref, p_plus, p_minus, alpha):
    """L-BFGS on the logits of π_θ = softmax(log π_ref + θ) from θ = 0 (float64) → π_θ."""
    ref, p_plus, p_minus = (t.double() for t in (ref, p_plus, p_minus))
    theta = torch.zeros_like(ref, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _population_loss(torch.log_softmax(ref.log() + theta, 0) - ref.log(), p_plus,
                                p_minus, alpha)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(ref.log() + theta, 0).detach().float()


def _adam(ref, p_plus, p_minus, alpha, checkpoints):
    """Adam (lr 0.05) from θ = 0, as a training run would go; r_θ = π_θ/π_ref at the
    checkpoints and the final π_θ."""
    theta = torch.zeros_like(ref, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    seen = {}
    for step in range(1, max(checkpoints) + 1):
        logp = torch.log_softmax(ref.log() + theta, 0)
        loss = _population_loss(logp - ref.log(), p_plus, p_minus, alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in checkpoints:
            seen[step] = torch.exp(logp - ref.log()).detach()
    return torch.softmax(ref.log() + theta, 0).detach(), seen


P_PLUS = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
P_MINUS = torch.tensor([0.0, 0.1, 0.2, 0.2, 0.3, 0.2])


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_toy_policy_converges_to_ref_times_relative_ratio(alpha):
    # answers drawn from π_ref and split by a judgement: π_ref is the α-mixture, π_ref·r*_α = p⁺
    ref = alpha * P_PLUS + (1 - alpha) * P_MINUS
    pi = _fit(ref, P_PLUS, P_MINUS, alpha)
    target = ref * relative_ratio(P_PLUS, P_MINUS, alpha)
    target = target / target.sum()
    assert (pi - target).abs().sum() < 1e-4
    assert (pi - P_PLUS).abs().sum() < 1e-4


def test_toy_policy_with_another_reference_lands_near_the_normalised_target():
    alpha = 0.5
    ref = 0.5 * (alpha * P_PLUS + (1 - alpha) * P_MINUS) + 0.5 / 6  # not the mixture
    pi = _fit(ref, P_PLUS, P_MINUS, alpha)
    target = ref * relative_ratio(P_PLUS, P_MINUS, alpha)
    target = target / target.sum()
    assert (pi - target).abs().sum() < 0.05  # normalisation moves the optimum a little
    assert (pi[4:] < 1e-3).all()  # answers never preferred: r*_α = 0


def test_rdro_stays_bounded_where_ddro_diverges():
    # 5 answers in the data, the 6th stands for the rest of the sequence space (π_ref 0.98,
    # in no data set); answer 0 is preferred and never non-preferred, with π_ref(0) = 0.002
    p_plus = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0])
    p_minus = torch.tensor([0.0, 0.2, 0.3, 0.5, 0.0, 0.0])
    ref = torch.tensor([0.002, 0.003, 0.004, 0.005, 0.006, 0.98])
    alpha = 0.5
    pi, seen = _adam(ref, p_plus, p_minus, alpha, checkpoints=(600, 1200))
    assert float(seen[1200].max()) <= 1 / alpha + 1e-2  # r_θ ≤ 1/α
    assert float(seen[1200][0]) == pytest.approx(1 / alpha, abs=1e-2)  # r*_α(0) = 1/α
    assert (seen[1200] - seen[600]).abs().max() < 1e-2  # converged
    assert float(pi[5]) > 0.95  # most mass stays where π_ref had it

    pi_d, seen_d = _adam(ref, p_plus, p_minus, 0.0, checkpoints=(600, 1200))
    assert float(seen_d[600][0]) > 100 * (1 / alpha)  # r_θ(0) runs towards 1/π_ref(0) = 500
    assert float(seen_d[1200][0]) > float(seen_d[600][0])  # still growing
    assert float(pi_d[0]) > 0.9  # the policy collapses onto the one preferred-only answer


def _completions():
    return ([Completion(f"p{i}", f"good {i}", 1.0, True) for i in range(3)]
            + [Completion(f"p{i}", f"bad {i}", -1.0, False) for i in range(5)])


def test_objective_batches_half_preferred_half_not():
    obj = rdro_objective(_completions(), beta=1.0, alpha=0.5)
    idx = obj.sample(random.Random(0), 4)
    assert [obj.sequences[i][1].split()[0] for i in idx] == ["good", "good", "bad", "bad"]
    lp = torch.zeros(len(idx), requires_grad=True)
    loss = obj.loss(lp, torch.zeros(len(idx)))
    assert float(loss.detach()) == pytest.approx(2 * LOG2)
    loss.backward()
    assert (lp.grad[:2] < 0).all() and (lp.grad[2:] > 0).all()  # up on p⁺, down on p⁻


def test_stats_at_the_reference_and_after():
    obj = rdro_objective(_completions(), beta=1.0, alpha=0.5)
    ref = torch.full((8,), -5.0)
    before = obj.stats(ref, ref)
    assert before["loss"] == pytest.approx(2 * LOG2) and before["accuracy"] == 0.0
    assert before["ratio_max"] == pytest.approx(1.0) and before["ratio_bound"] == 2.0
    moved = ref + torch.tensor([0.5] * 3 + [-0.5] * 5)
    after = obj.stats(moved, ref)
    assert after["accuracy"] == 1.0 and after["reward_margin"] == pytest.approx(1.0)
    assert after["loss"] < before["loss"]
    assert rdro_stats(torch.tensor([0.2, -0.1]), torch.tensor([1.0, -1.0]), 0.5)[
        "ratio_max"] == pytest.approx(math.exp(0.2))


def test_objective_needs_both_sides_and_alpha_inside_zero_one():
    with pytest.raises(ValueError, match="non-preferred"):
        rdro_objective(_completions()[:3], 1.0, 0.5)
    for alpha in (0.0, 1.0):
        with pytest.raises(ValueError, match="alpha"):
            rdro_objective(_completions(), 1.0, alpha)


def _parse(*argv: str) -> argparse.Namespace:
    from finetune.cli import add_arguments, check_flags

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["rdro", "--data", "x.jsonl", "--out", str(Path("/tmp/none")), *argv])
    check_flags(ns)
    return ns


def test_cli_flags():
    ns = _parse()
    assert ns.alpha == 0.5 and ns.batch_size == 8  # completions per step, as KLDO
    for bad in (["--alpha", "0"], ["--alpha", "1"], ["--alpha", "-0.2"]):
        with pytest.raises(ValueError, match="--alpha"):
            _parse(*bad)


def test_rdro_trains_through_the_cli_with_kl_in_the_report(tmp_path_factory, tmp_path):
    pytest.importorskip("peft")
    import json

    from test_finetune_methods import _tiny_model

    from finetune.cli import train_checkpoint

    tiny = _tiny_model(tmp_path_factory.mktemp("tiny"))
    out = tmp_path / "ckpt"
    report = train_checkpoint("rdro", out, "--model", str(tiny), "--steps", "3", "--lr", "1e-2",
                              "--limit", "24", "--max-length", "32", "--kl-every", "2",
                              "--kl-prompts", "2", "--kl-samples", "3", "--kl-tokens", "4")
    assert (out / "model.safetensors").is_file()
    before, after = report["before"]["train"], report["after"]["train"]
    assert before["loss"] == pytest.approx(2 * LOG2) and after["loss"] != before["loss"]
    assert report["config"]["alpha"] == 0.5 and report["beta"]["value"] == 1.0
    assert after["ratio_bound"] == 2.0 and report["method"] == "rdro"
    kl = json.loads((out / "report.json").read_text())["kl"]
    steps = [e["step"] for e in kl["entries"]]
    assert steps[0] == 0 and steps[-1] == 3 and kl["entries"][0]["kl"] == 0.0
    assert all(math.isfinite(e["kl"]) for e in kl["entries"])
    assert kl["prompts_source"] == "held_out" and kl["config"]["samples"] == 3
    assert "## KL(π_θ‖π_ref) through training" in (out / "report.md").read_text()
    assert (out / "kl_curve.png").stat().st_size > 0
