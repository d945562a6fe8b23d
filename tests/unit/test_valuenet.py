"""valuenet: CD-FUDGE / CD-Q losses, the offline trainer, checkpoints, value-head scorers, the
`train-value` command and the server's `value:NAME` wiring. A tiny random Llama stands in for
the policy (hidden 32, 2 layers, vocabulary 64)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from decoding.protocols import QScorer, TokenScorer  # noqa: E402
from valuenet.data import Manifest, Rollout, append_rollouts, write_manifest  # noqa: E402
from valuenet.losses import cdq_loss, cdq_targets, expected_q, fudge_loss, taken_values  # noqa: E402

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


def write_rollouts(folder, rule, prompts=24, k=4, seed=0, temperature=1.0, model_path=None):
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
    extra = {} if model_path is None else {"model_path": model_path}
    write_manifest(folder, Manifest("tiny", "synthetic", k, 7, temperature, "synthetic",
                                    extra=extra))
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
    from heads.scorer import load_value_head
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
    from heads.scorer import load_value_head
    from valuenet.train import TrainConfig, split_by_prompt, train

    rows = write_rollouts(tmp_path / "data", "first3", prompts=10)
    cfg = TrainConfig(method="fudge", tune="lora", steps=40, lr=1e-2, lora_lr=3e-3,
                      eval_every=40, progress=False, select="last")  # overfits on purpose
    train(tmp_path / "data", tmp_path / "out", cfg, backbone=backbone)
    assert (tmp_path / "out" / "adapter").is_dir()
    train_rows, _ = split_by_prompt(rows, 0.2, 0)
    scorer = load_value_head(tmp_path / "out")
    assert value_error(scorer, train_rows) < 0.5 * baseline_error(train_rows, train_rows)


def test_scorer_on_prefixes_scores_every_decoded_prefix():
    """The baseline curve's input: r(x, decode(y[:t])) for t = 0..len(y); at the full length it
    is the reward itself, so its last bucket correlates perfectly when the scorer is the reward."""
    from valuenet.report import correlation_by_prefix_length, scorer_on_prefixes

    class CountA:  # reward: how many A tokens the text holds (no score_pairs: the fallback path)
        def score(self, prompt, responses):
            return [float(text.split().count(str(A))) for text in responses]

    rng = random.Random(3)
    rows = [Rollout(f"p{i}", f"prompt {i}", [1], 0, [rng.choice([A, 9]) for _ in range(5)],
                    [0.0] * 5, "", "stop", 0.0) for i in range(12)]
    values = scorer_on_prefixes(CountA(), lambda ids: " ".join(map(str, ids)), rows, batch_size=7)
    assert [len(v) for v in values] == [6] * 12
    for r, v in zip(rows, values):
        assert v == [float(r.token_ids[:t].count(A)) for t in range(6)]
    rewards = [float(r.token_ids.count(A)) for r in rows]
    last = correlation_by_prefix_length([v[5:] for v in values], rewards)
    assert last[0]["pearson"] == pytest.approx(1.0)


def test_within_prompt_correlation_ignores_what_separates_prompts():
    """Centred per prompt: a value that only knows the prompt's mean reward has no within-prompt
    correlation (pooled: 0.95), one that ranks each prompt's candidates scores 1 within them."""
    from valuenet.report import correlation_by_prefix_length

    rewards = [0.1, 0.3, 0.7, 0.9]            # prompt a: 0.1 < 0.3, prompt b: 0.7 < 0.9
    groups = ["a", "a", "b", "b"]
    prompt_mean = [[0.2], [0.2], [0.8], [0.8]]
    ranks = [[5.0], [6.0], [1.0], [2.0]]      # right order within each prompt, wrong across
    assert correlation_by_prefix_length(prompt_mean, rewards)[0]["pearson"] > 0.9
    assert correlation_by_prefix_length(prompt_mean, rewards, groups)[0]["pearson"] is None
    assert correlation_by_prefix_length(ranks, rewards)[0]["pearson"] < 0
    assert correlation_by_prefix_length(ranks, rewards, groups)[0]["pearson"] == \
        pytest.approx(1.0)


def test_trainer_reports_the_baseline_curve(backbone, tmp_path, monkeypatch):
    """--baseline SCORER: the same buckets as the head's curve, in metrics.json and the plot."""
    import transformers as tf

    from valuenet.train import TrainConfig, train

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", lambda *a, **k: Tok())
    write_rollouts(tmp_path / "data", "last", prompts=10)
    metrics = train(tmp_path / "data", tmp_path / "out", TrainConfig(
        method="fudge", steps=5, progress=False, baseline="length"), backbone=backbone)
    head, base = metrics["correlation_by_prefix_length"], metrics["baseline_correlation_by_prefix_length"]
    assert metrics["baseline"] == "length"
    assert [(b["lo"], b["hi"], b["points"]) for b in base] == \
        [(b["lo"], b["hi"], b["points"]) for b in head]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["baseline_correlation_by_prefix_length"] == base
    within = saved["baseline_within_prompt_correlation_by_prefix_length"]
    assert [b["points"] for b in within] == [b["points"] for b in base]
    assert len(saved["within_prompt_correlation_by_prefix_length"]) == len(head)
    assert (tmp_path / "out" / "correlation.png").is_file()


def test_split_needs_two_prompts(tmp_path):
    from valuenet.train import split_by_prompt

    rows = [Rollout("only", "p", [1, 2], k, [3], [0.0], "", "stop", 1.0) for k in range(3)]
    with pytest.raises(ValueError, match="at least 2 prompts"):
        split_by_prompt(rows, 0.2, 0)


# -- checkpoints and scorers -------------------------------------------------------------------


def _random_checkpoint(backbone, folder, method):
    from heads.model import HeadConfig, ValueHead, save_checkpoint

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
    from heads.model import hidden_states, load_causal_lm, pad_batch
    from heads.scorer import load_value_head

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
    from heads.scorer import load_value_head

    _random_checkpoint(backbone, tmp_path, "fudge")
    scorer = load_value_head(tmp_path)
    scorer._tokenizer = _FakeTokenizer()
    got = scorer.score("hello", ["a bb", "ccc"])
    assert got == pytest.approx(scorer.score_ids([1, 11, 5, 2], [[11, 12], [13]]))


def test_q_values_match_one_token_longer_responses(backbone, tmp_path):
    from heads.scorer import load_value_head

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
    from heads.scorer import load_value_head

    rows, out = trained
    scorer = load_value_head(out["cdq"][0])
    responses = [r.token_ids for r in rows[:4]]
    together = scorer.score_ids(rows[0].prompt_ids, responses)
    alone = [scorer.score_ids(rows[0].prompt_ids, [r])[0] for r in responses]
    assert together == pytest.approx(alone, abs=1e-5)


# -- command line -------------------------------------------------------------------------------


def _cli(*argv):
    from cli.main import main

    return main(["train-value", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--method", "bogus", "--steps", "5"], "invalid choice"),
    (["--method", "fudge", "--steps", "0"], "must be > 0"),
    (["--method", "fudge", "--steps", "5", "--val-fraction", "1.5"], "must be in (0, 1)"),
    (["--steps", "5"], "--method"),  # --steps is optional (scaled to the data)
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
    write_rollouts(tmp_path / "data", "last", prompts=6, k=2, model_path=backbone)
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

    from cli.serve import _add_settings_flags, settings_from_args
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
    from runtime.scorers import ScorerRegistry, UnknownScorer, load_value_heads

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


# -- sampling temperature of the targets and of the requests (issue 11, items 3 and 9) ---------


def test_advantage_targets_are_centred_on_each_prompts_mean_reward(tmp_path):
    from valuenet.data import read_rollouts
    from valuenet.train import TrainConfig, _examples

    write_rollouts(tmp_path / "data", "last", prompts=3, k=4)
    _, rows = read_rollouts(tmp_path / "data")
    rows[0].prompt_id = rows[1].prompt_id = ""  # unnamed prompts group by their ids
    plain = _examples(rows, 0.5, 2.0, "terminal")
    adv = _examples(rows, 0.5, 2.0, "terminal", "advantage")
    assert [e.reward for e in plain] == [(r.reward - 0.5) / 2.0 for r in rows]
    for e, r in zip(adv, rows):
        group = [o.reward for o in rows if (o.prompt_id or repr(o.prompt_ids))
                 == (r.prompt_id or repr(r.prompt_ids))]
        assert e.reward == pytest.approx((r.reward - sum(group) / len(group)) / 2.0)
        assert e.raw_reward == r.reward  # reports keep the reward itself
    with pytest.raises(ValueError, match="target"):
        TrainConfig(target="value").validate()


def test_policy_probs_is_the_greedy_policy_at_temperature_zero():
    from heads.model import policy_probs

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, -1.0]])
    assert policy_probs(logits, 0.0).tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    half = policy_probs(logits, 0.5)[0]  # softmax(2·logits): e² : e⁶ : e⁴
    z = math.exp(2) + math.exp(6) + math.exp(4)
    assert half.tolist() == pytest.approx([math.exp(2) / z, math.exp(6) / z, math.exp(4) / z])
    with pytest.raises(ValueError):
        policy_probs(logits, -1.0)


def test_cdq_targets_at_temperature_zero_follow_the_argmax(backbone, tmp_path):
    """Greedy rollouts: π_ref is one-hot at the backbone's argmax, so the bootstrap target is
    Q(x, yᵗ, argmax), not the T = 1 softmax average; the checkpoint records T = 0."""
    from heads.model import hidden_states, load_causal_lm, pad_batch
    from valuenet.data import read_rollouts
    from valuenet.train import TrainConfig, _examples, _precompute, train

    write_rollouts(tmp_path / "data", "last", prompts=6, k=2, temperature=0.0)
    _, rows = read_rollouts(tmp_path / "data")
    cfg = TrainConfig(method="cdq", ref_top_k=4, progress=False)
    lm = load_causal_lm(backbone)
    exs = _examples(rows[:3], 0.0, 1.0, "terminal")
    assert _precompute(lm, None, exs, cfg, 0.0, cache_hidden=True) == 1.0  # all mass kept
    for e in exs:
        ids, mask = pad_batch([e.seq])
        with torch.no_grad():
            greedy = lm.lm_head(hidden_states(lm, ids, mask)[0, e.start:]).argmax(-1)
        assert e.ref_idx[:, 0].tolist() == greedy.tolist()
        assert e.ref_p[:, 0].tolist() == [1.0] * len(e.ids)
        assert float(e.ref_p[:, 1:].abs().sum()) == 0.0

    metrics = train(tmp_path / "data", tmp_path / "head", TrainConfig(
        method="cdq", steps=2, ref_top_k=4, progress=False), backbone=backbone)
    assert metrics["ref_mass"] == 1.0 and metrics["temperature"] == 0.0
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert (config["temperature"], config["top_p"]) == (0.0, 1.0)


def _head_with_sampling(backbone, folder, **fields):
    from heads.model import HeadConfig, ValueHead, save_checkpoint
    from heads.scorer import load_value_head

    cfg = HeadConfig(method="cdq", backbone=backbone, reference=backbone, hidden_size=32,
                     vocab_size=VOCAB, **fields)
    save_checkpoint(folder, ValueHead("cdq", 32, VOCAB), cfg)
    return load_value_head(folder, name="value:h")


def test_trained_sampling_is_recorded_and_mismatches_are_warned(backbone, tmp_path, trained):
    scorer = _head_with_sampling(backbone, tmp_path / "a", temperature=0.7, top_p=0.9)
    assert (scorer.trained_temperature, scorer.trained_top_p) == (0.7, 0.9)
    assert scorer.warnings_for(0.7, 0.9) == []
    assert scorer.warnings_for(0.7 + 1e-9, 0.9) == []  # float noise is the same setting
    (w,) = scorer.warnings_for(1.0, 0.9)
    assert w == ("value:h was trained on rollouts sampled at temperature 0.7, this request "
                 "samples at temperature 1: its values are those of the other sampling "
                 "distribution, so the tilt does not target π*")
    (w,) = scorer.warnings_for(0.7, 1.0)
    assert "top_p 0.9" in w and "top_p 1" in w
    assert len(scorer.warnings_for(0.0, 1.0)) == 2
    # checkpoints written before these fields: the temperature from the training config
    old = _head_with_sampling(backbone, tmp_path / "b", train={"temperature": 1.0})
    assert (old.trained_temperature, old.trained_top_p) == (1.0, 1.0)
    assert old.warnings_for(1.0, 1.0) == [] and len(old.warnings_for(0.0, 1.0)) == 1
    unknown = _head_with_sampling(backbone, tmp_path / "c")
    assert unknown.trained_temperature is None
    assert "does not record" in unknown.warnings_for(1.0, 1.0)[0]
    # a trained head carries its rollouts' temperature (1.0 in these rollouts)
    from heads.scorer import load_value_head

    fresh = load_value_head(trained[1]["fudge"][0])
    assert (fresh.trained_temperature, fresh.trained_top_p) == (1.0, 1.0)
    assert fresh.warnings_for(1.0, 1.0) == []


def test_greedy_head_values_the_bare_prompt_under_the_argmax(backbone, tmp_path):
    from heads.model import hidden_states, load_causal_lm, pad_batch

    scorer = _head_with_sampling(backbone, tmp_path / "g", temperature=0.0, top_p=1.0)
    torch.manual_seed(3)
    for p in scorer._head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    prompt = [11, 12, 13]
    lm = load_causal_lm(backbone)
    with torch.no_grad():
        h = hidden_states(lm, *pad_batch([prompt]))[0, -1]
        want = float(scorer._head.q(h, lm.lm_head(h).argmax()[None])[0])
    assert scorer.score_ids(prompt, [[]])[0] == pytest.approx(want, abs=1e-5)


def test_policy_is_checked_against_the_rollouts_manifest(backbone, tmp_path, capsys):
    from valuenet.cli import policy_mismatch

    write_rollouts(tmp_path / "data", "last", prompts=6, k=2, model_path=backbone)
    code = _cli("--data", str(tmp_path / "data"), "--method", "cdq", "--steps", "1",
                "--out", str(tmp_path / "o"), "--policy", str(tmp_path), "--no-progress")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "not the policy the rollouts were drawn from" in err and "\n" not in err
    assert f"pass --policy {backbone}" in err and not (tmp_path / "o").exists()

    m = Manifest("SmolLM2-135M-Instruct", "p", 2, 8, 1.0, "r",
                 extra={"model_path": "/home-a/models/SmolLM2-135M-Instruct"})
    assert policy_mismatch(m, "embedded", "/home-b/models/SmolLM2-135M-Instruct") is None
    assert policy_mismatch(m, "/ckpt/x", "/ckpt/x") is not None
    hf = Manifest("org/model", "p", 2, 8, 1.0, "r", extra={"model_path": "org/model"})
    assert policy_mismatch(hf, "org/model", "org/model") is None
    legacy = Manifest("tiny", "p", 2, 8, 1.0, "r")  # no model_path: by name
    assert policy_mismatch(legacy, "/x/tiny", "/x/tiny") is None
    assert policy_mismatch(legacy, "/x/other", "/x/other") is not None


# -- issue 26: certified value range, early stopping, sampling warnings --------------------------


def test_every_control_that_changes_p_is_warned(backbone, tmp_path):
    scorer = _head_with_sampling(backbone, tmp_path / "w", temperature=1.0, top_p=1.0)
    neutral = {"top_k": 0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
               "repetition_penalty": 1.0, "logit_bias": (), "min_tokens": 0, "structured": None,
               "seed": 3, "stop": ("x",), "max_tokens": 9}  # the last three do not change p
    assert scorer.warnings_for(1.0, 1.0, **neutral) == []
    changed = {"top_k": 40, "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": -0.2,
               "repetition_penalty": 1.1, "logit_bias": ((5, 2.0),), "min_tokens": 4,
               "structured": ("json_object", "")}
    for field, value in changed.items():
        (w,) = scorer.warnings_for(1.0, 1.0, **{**neutral, field: value})
        assert f"sampled at {field} " in w and "does not target π*" in w, w
    assert len(scorer.warnings_for(0.5, 0.9, **{**neutral, **changed})) == 2 + len(changed)
    assert "logit_bias {5: 2}" in scorer.warnings_for(1.0, logit_bias=((5, 2.0),))[0]
    # the server passes every resolved control by name (server/fields.py sampling_fields)
    resolved = {"temperature": 1.0, "top_p": 1.0, **neutral, "stop_token_ids": (),
                "ignore_eos": False, "top_logprobs": 0}
    assert scorer.warnings_for(**resolved) == []
    assert len(scorer.warnings_for(**{**resolved, "top_k": 5, "temperature": 0.5})) == 2


def _ranged_head(backbone, folder, method, value_range):
    from heads.model import HeadConfig, ValueHead, save_checkpoint

    torch.manual_seed(5)
    head = ValueHead(method, 32, VOCAB)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=3.0)  # values far outside the range
    save_checkpoint(folder, head, HeadConfig(
        method=method, backbone=backbone, reference=backbone, hidden_size=32, vocab_size=VOCAB,
        reward_mean=0.5, reward_std=0.25, temperature=1.0, top_p=1.0, value_range=value_range))


@pytest.mark.parametrize("method", ["fudge", "cdq"])
def test_scorers_clip_to_the_certified_range(backbone, tmp_path, method):
    from heads.scorer import load_value_head

    _ranged_head(backbone, tmp_path / method, method, [0.0, 1.0])
    scorer = load_value_head(tmp_path / method)
    assert scorer.value_range == (0.0, 1.0) and scorer.vocab_size == VOCAB
    values = scorer.score_ids([11, 12], [[], [3], [3, 4, 5], [9] * 6])
    assert all(0.0 <= v <= 1.0 for v in values) and len(set(values)) > 1
    if method == "cdq":
        q = scorer.q_values([11, 12], [3], list(range(VOCAB)))
        assert min(q) == 0.0 and max(q) == 1.0  # clipped at both ends
    # a checkpoint without a range: no clip, and no certified range
    _ranged_head(backbone, tmp_path / "free", method, None)
    free = load_value_head(tmp_path / "free")
    assert free.value_range is None
    assert max(abs(v) for v in free.score_ids([11, 12], [[3, 4, 5], [9] * 6])) > 1.0


def test_the_engine_head_clips_to_the_certified_range(backbone, tmp_path):
    from heads.incremental import IncrementalQ
    from heads.processor import TiltArgs, _Req

    _ranged_head(backbone, tmp_path / "q", "cdq", [-0.5, 2.0])
    head = IncrementalQ(tmp_path / "q")
    r = _Req(TiltArgs("value:q", 1.0, "0" * 16), [11, 12, 13], [], 1.0)
    q = head.step([r])
    assert float(q.min()) == -0.5 and float(q.max()) == 2.0
    r.close()


def test_a_head_that_learns_nothing_is_the_baseline_and_says_so(backbone, tmp_path):
    """Rewards independent of the tokens: no step beats predicting the training mean on
    held-out prompts. The saved head is that baseline (its initial validation error is the
    baseline's, computed by hand), and metrics name the verdict."""
    from heads.scorer import load_value_head
    from valuenet.data import read_rollouts
    from valuenet.train import NO_GAIN, TrainConfig, split_by_prompt, train

    rows = write_rollouts(tmp_path / "data", "last", prompts=12)
    rng = random.Random(7)
    for r in rows:
        r.reward = float(rng.random() < 0.5)
    (tmp_path / "data" / "rollouts.jsonl").unlink()
    append_rollouts(tmp_path / "data", rows)
    _, rows = read_rollouts(tmp_path / "data")
    metrics = train(tmp_path / "data", tmp_path / "out", TrainConfig(
        method="fudge", steps=60, lr=3e-2, eval_every=5, normalize_rewards=False,
        progress=False), backbone=backbone)
    train_rows, val_rows = split_by_prompt(rows, 0.2, 0)
    mean = sum(r.reward for r in train_rows) / len(train_rows)
    states = [(r.reward, len(r.token_ids) + 1) for r in val_rows]  # every prefix state
    by_hand = 0.5 * sum(n * (r - mean) ** 2 for r, n in states) / sum(n for _, n in states)
    assert metrics["initial_val_value_mse"] == pytest.approx(by_hand, rel=1e-5)
    assert metrics["best_step"] == 0 and metrics["beats_initialisation"] is False
    assert metrics["verdict"] == NO_GAIN
    assert metrics["last_step"] < 60  # stopped early: `patience` validations without a gain
    assert metrics["val_value_mse"] == metrics["initial_val_value_mse"]
    scorer = load_value_head(tmp_path / "out")
    assert scorer.score_ids([11, 12], [[3], [4, 5]]) == pytest.approx([mean, mean], abs=1e-5)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["verdict"] == NO_GAIN


def test_default_schedule_scales_with_the_data():
    from valuenet.train import TrainConfig, default_schedule

    small, big = default_schedule(TrainConfig(), 96), default_schedule(TrainConfig(), 20_000)
    assert small[1] < big[1] == pytest.approx(1e-3)  # small data: smaller steps
    assert small[0] == 8 * 6 and big[0] == 2000  # ~8 epochs, capped
    assert default_schedule(TrainConfig(), 3)[0] == 20  # at least MIN_STEPS
    assert default_schedule(TrainConfig(steps=7, lr=0.1), 96) == (7, 0.1)  # given: kept
