"""valuenet: CD-FUDGE / CD-Q losses, the offline trainer, checkpoints, value-head scorers, the
`train-value` command and the server's `value:NAME` wiring. A tiny random Llama stands in for
the policy (hidden 32, 2 layers, vocabulary 64)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from decoding.protocols import QScorer, TokenScorer  # noqa: E402
from valuenet.data import Manifest, Rollout, append_rollouts, write_manifest  # noqa: E402
from valuenet.losses import (cdq_loss, cdq_targets, expected_q, fudge_loss,  # noqa: E402
                             taken_values)

A = 7  # the token the synthetic rewards look for
VOCAB = 64


# -- losses on hand-made tensors ---------------------------------------------------------------


def test_fudge_loss_masks_prompt_and_padding():
    # row 0: prompt token (masked), 2 prefix states, padding; row 1: 3 prefix states
    values = torch.tensor([[7.0, 0.5, 1.0, 9.0], [3.0, 2.0, 0.0, -5.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    reward = torch.tensor([1.0, 0.0])
    # squared errors: 0.25, 0 | 4, 0, 25 → ½ · 29.25 / 5
    assert fudge_loss(values, reward, mask).item() == pytest.approx(2.925)


def test_cdq_targets_by_hand():
    # one row: position 0 = prompt, 1..2 = response (2 is the last / EOS), 3 = padding; V = 2
    q = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [8.0, 8.0]]])
    ids = torch.tensor([[0, 1, 0, 0]])
    probs = torch.tensor([[[0.5, 0.5], [0.25, 0.75], [1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[0, 1, 1, 0]])
    assert taken_values(q, ids).tolist() == [[0.0, 2.0, 3.0, 5.0]]  # Q[i−1, ids[i]]
    exp = expected_q(q, probs)
    assert exp.tolist() == [[1.5, 3.75, 5.0, 0.0]]
    reward = torch.tensor([10.0])
    # before EOS: the bootstrap Σ π Q at the same position; at EOS: r; outside the mask: 0
    assert cdq_targets(exp, reward, mask).tolist() == [[0.0, 3.75, 10.0, 0.0]]
    # a non-terminal row (cut by length, bootstrap mode) bootstraps its last token too
    assert cdq_targets(exp, reward, mask, torch.tensor([False])).tolist() == [[0.0, 3.75, 5.0, 0.0]]
    # loss: ½ · ((2 − 3.75)² + (3 − 10)²) / 2
    loss = cdq_loss(taken_values(q, ids), exp, reward, mask)
    assert loss.item() == pytest.approx(0.5 * (1.75**2 + 7**2) / 2)


def test_cdq_loss_stops_the_gradient_through_targets():
    q = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]], requires_grad=True)
    ids = torch.tensor([[0, 1, 0]])
    probs = torch.tensor([[[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]]])
    mask = torch.tensor([[0, 1, 1]])
    cdq_loss(taken_values(q, ids), expected_q(q, probs), torch.tensor([10.0]), mask).backward()
    grad = q.grad[0]
    # only the taken entries Q[0, 1] and Q[1, 0] receive gradient: d/dv ½(v − t)²/2 = (v − t)/2
    assert grad[0, 1].item() == pytest.approx((2 - 3.75) / 2)
    assert grad[1, 0].item() == pytest.approx((3 - 10) / 2)
    grad[0, 1] = grad[1, 0] = 0
    assert torch.count_nonzero(grad) == 0


# -- fixtures: a tiny Llama and synthetic rollouts --------------------------------------------


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def write_rollouts(folder, rule, prompts=24, k=4, seed=0):
    """Rollouts whose reward is a function of the response; A is planted in half of them."""
    rng = random.Random(seed)
    rows = []
    for p in range(prompts):
        prompt = [rng.randrange(10, VOCAB) for _ in range(rng.randint(2, 5))]
        for j in range(k):
            resp = [rng.choice([t for t in range(3, VOCAB) if t != A])
                    for _ in range(rng.randint(3, 7))]
            rule_plant = rng.random() < 0.5
            if rule_plant and rule == "last":
                resp[-1] = A
            elif rule_plant:
                resp[rng.randrange(3)] = A
            reward = float(resp[-1] == A) if rule == "last" else float(A in resp[:3])
            rows.append(Rollout(f"p{p}", f"prompt {p}", prompt, j, resp, [0.0] * len(resp), "",
                                rng.choice(["stop", "length"]), reward))
    write_manifest(folder, Manifest("tiny", "synthetic", k, 7, 1.0, "synthetic"))
    append_rollouts(folder, rows)
    return rows


def value_error(scorer, rows):
    """½ · mean (V(x, y) − r)² over full responses."""
    values = [scorer.score_ids(r.prompt_ids, [r.token_ids])[0] for r in rows]
    return 0.5 * sum((v - r.reward) ** 2 for v, r in zip(values, rows)) / len(rows)


def baseline_error(train_rows, rows):
    mean = sum(r.reward for r in train_rows) / len(train_rows)
    return 0.5 * sum((mean - r.reward) ** 2 for r in rows) / len(rows)


@pytest.fixture(scope="module")
def trained(backbone, tmp_path_factory):
    """Frozen-backbone FUDGE and CD-Q heads on 'reward = 1 iff the last token is A'."""
    from valuenet.train import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    rows = write_rollouts(root / "data", "last", prompts=60)
    out = {}
    for method in ("fudge", "cdq"):
        cfg = TrainConfig(method=method, steps=200, lr=1e-2, progress=False)
        metrics = train(root / "data", root / method, cfg, backbone=backbone)
        out[method] = (root / method, metrics)
    return rows, out


# -- trainer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fudge", "cdq"])
def test_frozen_head_learns_prefix_reward(trained, method):
    from valuenet.scorer import load_value_head
    from valuenet.train import split_by_prompt

    rows, out = trained
    folder, metrics = out[method]
    train_rows, val_rows = split_by_prompt(rows, 0.2, 0)
    assert not {r.prompt_id for r in train_rows} & {r.prompt_id for r in val_rows}
    scorer = load_value_head(folder, name=f"value:{method}")
    # V(x, y) of full responses (where r is determined) beats predicting the training mean by
    # far, on held-out prompts too. Over all prefix states the gain is small (the earlier ones
    # say little about whether the last token will be A), so the test reads full responses.
    assert value_error(scorer, val_rows) < 0.6 * baseline_error(train_rows, val_rows)
    assert value_error(scorer, train_rows) < 0.6 * baseline_error(train_rows, train_rows)
    assert metrics["best_step"] > 0
    assert metrics["val_rows"] == len(val_rows) and metrics["train_rows"] == len(train_rows)
    last = metrics["correlation_by_prefix_length"][-1]
    assert last["pearson"] is not None and last["pearson"] > 0.3
    for name in ("config.json", "head.safetensors", "metrics.json", "loss.png", "correlation.png"):
        assert (folder / name).is_file(), name
    saved = json.loads((folder / "metrics.json").read_text())
    assert {"initial_val_loss", "val_loss", "correlation_by_prefix_length"} <= saved.keys()


def test_lora_backbone_overfits_first_tokens_rule(backbone, tmp_path):
    """'reward = 1 iff A is among the first 3 response tokens' needs the backbone to carry the
    information forward: a frozen random backbone cannot, LoRA adapters can."""
    from valuenet.scorer import load_value_head
    from valuenet.train import TrainConfig, split_by_prompt, train

    rows = write_rollouts(tmp_path / "data", "first3", prompts=10)
    cfg = TrainConfig(method="fudge", tune="lora", steps=40, lr=1e-2, lora_lr=3e-3,
                      eval_every=40, progress=False)
    train(tmp_path / "data", tmp_path / "out", cfg, backbone=backbone)
    assert (tmp_path / "out" / "adapter").is_dir()
    train_rows, _ = split_by_prompt(rows, 0.2, 0)
    scorer = load_value_head(tmp_path / "out")
    assert value_error(scorer, train_rows) < 0.5 * baseline_error(train_rows, train_rows)


def test_split_needs_two_prompts(tmp_path):
    from valuenet.train import split_by_prompt

    rows = [Rollout("only", "p", [1, 2], k, [3], [0.0], "", "stop", 1.0) for k in range(3)]
    with pytest.raises(ValueError, match="at least 2 prompts"):
        split_by_prompt(rows, 0.2, 0)


# -- checkpoints and scorers -------------------------------------------------------------------


def _random_checkpoint(backbone, folder, method):
    from valuenet.model import HeadConfig, ValueHead, save_checkpoint

    torch.manual_seed(1)
    head = ValueHead(method, 32, VOCAB)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    cfg = HeadConfig(method=method, backbone=backbone, reference=backbone, hidden_size=32,
                     vocab_size=VOCAB, reward_mean=0.5, reward_std=2.0)
    save_checkpoint(folder, head, cfg)
    return head


@pytest.mark.parametrize("method", ["fudge", "cdq"])
def test_checkpoint_round_trip(backbone, tmp_path, method):
    from valuenet.model import hidden_states, load_causal_lm, pad_batch
    from valuenet.scorer import load_value_head

    head = _random_checkpoint(backbone, tmp_path, method)
    scorer = load_value_head(tmp_path, name="value:t")
    lm = load_causal_lm(backbone)
    prompt, responses = [11, 12, 13], [[20, 21, 22], [30], []]
    got = scorer.score_ids(prompt, responses)
    with torch.no_grad():
        want = []
        for r in responses:
            ids, mask = pad_batch([prompt + r])
            h = hidden_states(lm, ids, mask)[0]
            if method == "fudge":
                v = head.value(h[-1])
            elif r:
                v = head.q(h[-2], torch.tensor([r[-1]]))[0]
            else:  # bare prompt: Σ_z π(z|x) Q(x, z)
                v = (lm.lm_head(h[-1]).softmax(-1) * head.q_all(h[-1])).sum()
            want.append(float(v) * 2.0 + 0.5)
    assert got == pytest.approx(want, abs=1e-5)
    assert isinstance(scorer, TokenScorer)
    assert hasattr(scorer, "q_values") == (method == "cdq")
    assert isinstance(scorer, QScorer) == (method == "cdq")


class _FakeTokenizer:
    """Stands in for the backbone's tokenizer (the tiny Llama has none)."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize and messages[0]["role"] == "user"
        return {"input_ids": [1, 11, len(messages[0]["content"]), 2]}

    def __call__(self, text, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": [10 + len(w) for w in text.split()]}


def test_text_fallback_chat_templates_the_prompt(backbone, tmp_path):
    from valuenet.scorer import load_value_head

    _random_checkpoint(backbone, tmp_path, "fudge")
    scorer = load_value_head(tmp_path)
    scorer._tokenizer = _FakeTokenizer()
    got = scorer.score("hello", ["a bb", "ccc"])
    assert got == pytest.approx(scorer.score_ids([1, 11, 5, 2], [[11, 12], [13]]))


def test_q_values_match_one_token_longer_responses(backbone, tmp_path):
    from valuenet.scorer import load_value_head

    _random_checkpoint(backbone, tmp_path, "cdq")
    scorer = load_value_head(tmp_path)
    prompt, resp = [11, 12, 13], [20, 21, 22, 23]
    for t in range(len(resp)):
        q = scorer.q_values(prompt, resp[:t], [resp[t], 5, 40])
        longer = scorer.score_ids(prompt, [resp[: t + 1], resp[:t] + [5], resp[:t] + [40]])
        assert q == pytest.approx(longer, abs=1e-5)
    with pytest.raises(ValueError):
        scorer.q_values(prompt, resp, [VOCAB])


def test_batched_scores_do_not_depend_on_the_batch(trained):
    from valuenet.scorer import load_value_head

    rows, out = trained
    scorer = load_value_head(out["cdq"][0])
    responses = [r.token_ids for r in rows[:4]]
    together = scorer.score_ids(rows[0].prompt_ids, responses)
    alone = [scorer.score_ids(rows[0].prompt_ids, [r])[0] for r in responses]
    assert together == pytest.approx(alone, abs=1e-5)


# -- command line -------------------------------------------------------------------------------


def _cli(*argv):
    from server.cli import main

    return main(["train-value", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--method", "bogus", "--steps", "5"], "invalid choice"),
    (["--method", "fudge", "--steps", "0"], "must be > 0"),
    (["--method", "fudge", "--steps", "5", "--val-fraction", "1.5"], "must be in (0, 1)"),
    (["--method", "fudge"], "--steps"),
])
def test_cli_argument_errors_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        _cli("--data", str(tmp_path), "--out", str(tmp_path / "o"), *argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_folder_without_rollouts(tmp_path, capsys):
    assert _cli("--data", str(tmp_path), "--method", "fudge", "--steps", "1",
                "--out", str(tmp_path / "o")) == 2
    assert "not a rollout folder" in capsys.readouterr().err


def test_cli_trains_and_prints_a_summary(backbone, tmp_path, capsys):
    write_rollouts(tmp_path / "data", "last", prompts=6, k=2)
    code = _cli("--data", str(tmp_path / "data"), "--method", "cdq", "--steps", "5",
                "--out", str(tmp_path / "o"), "--policy", backbone, "--no-progress")
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "cdq" and summary["val_rows"] == 2 * 1
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["method"] == "cdq" and config["backbone"] == config["reference"]


# -- server wiring --------------------------------------------------------------------------------


def test_value_head_flag_is_repeatable_and_env_is_comma_separated(monkeypatch):
    from pydantic import ValidationError

    from server.cli import _add_settings_flags, settings_from_args
    from server.settings import Settings

    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    ns = parser.parse_args(["--value-head", "a=/p", "--value-head", "b=~/q"])
    settings = settings_from_args(ns)
    assert settings.value_heads == "a=/p,b=~/q"
    assert list(settings.value_head_paths()) == ["a", "b"]
    monkeypatch.setenv("ALIGNSERVE_VALUE_HEADS", "x=/ckpt/x")
    assert Settings().value_head_paths() == {"x": __import__("pathlib").Path("/ckpt/x")}
    for bad in ("nopath", "a=/p,a=/q", "bad name=/p", "=/p"):
        with pytest.raises(ValidationError):
            Settings(value_heads=bad)


def test_registry_serves_value_heads(backbone, tmp_path):
    from server.scorers import ScorerRegistry, UnknownScorer, load_value_heads

    _random_checkpoint(backbone, tmp_path / "head", "cdq")
    registry = ScorerRegistry({}, None)
    for head in load_value_heads({"q": tmp_path / "head"}):
        registry.register(head)
    assert "value:q" in registry.names()

    async def lookups():
        scorer = await registry.get("value:q")
        assert scorer.name == "value:q" and hasattr(scorer, "q_values")
        with pytest.raises(UnknownScorer, match="value:q"):  # the message lists value:q
            await registry.get("value:nope")

    asyncio.run(lookups())
    with pytest.raises(ValueError, match="value head 'bad'.*missing"):
        load_value_heads({"bad": tmp_path / "missing"})
