"""The value head's own KV cache (heads/kvcache.py): the same values as without it, and the
backbone runs on new tokens only. A tiny random Llama (hidden 32, 2 layers, vocabulary 64)."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

VOCAB, K, M = 64, 4, 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from heads.model import HeadConfig, ValueHead, save_checkpoint

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      max_position_embeddings=256)
    backbone = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(backbone)
    out = {}
    for method in ("fudge", "cdq"):
        torch.manual_seed(1)
        head = ValueHead(method, 32, VOCAB)
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.5)
        folder = tmp_path_factory.mktemp(method)
        save_checkpoint(folder, head, HeadConfig(method=method, backbone=str(backbone),
                                                 reference=str(backbone), hidden_size=32,
                                                 vocab_size=VOCAB, reward_mean=0.5,
                                                 reward_std=2.0))
        out[method] = folder
    return out


def pair(folder, cache_tokens=8192):
    """(cached, uncached) scorers of one checkpoint."""
    from heads.scorer import load_value_head

    cached, plain = load_value_head(folder), load_value_head(folder)
    cached._backbone.cache.max_tokens = cache_tokens
    plain._backbone = None
    return cached, plain


def widths(scorer) -> list[int]:
    """Record the input width (tokens per row) of every backbone forward pass."""
    seen: list[int] = []
    scorer._lm.get_decoder().embed_tokens.register_forward_hook(
        lambda mod, args, out: seen.append(args[0].shape[1]))
    return seen


def block_rounds(seed=0, blocks=3):
    rng = random.Random(seed)
    prompt = [rng.randrange(3, VOCAB) for _ in range(7)]
    accepted: list[int] = []
    for _ in range(blocks):
        cands = [[rng.randrange(3, VOCAB) for _ in range(M)] for _ in range(K)]
        yield prompt, accepted, cands
        accepted = accepted + cands[rng.randrange(K)]


@pytest.mark.parametrize("method", ["fudge", "cdq"])
def test_blockwise_values_equal_uncached_and_cost_only_the_new_tokens(checkpoints, method):
    cached, plain = pair(checkpoints[method])
    seen = widths(cached)
    for block, (prompt, accepted, cands) in enumerate(block_rounds()):
        before = cached.backbone_tokens
        got = cached.score_ids(prompt, [accepted + c for c in cands])
        want = plain.score_ids(prompt, [accepted + c for c in cands])
        assert got == pytest.approx(want, abs=1e-5)
        if block == 0:  # the shared prompt once, then each candidate's own tokens
            assert cached.backbone_tokens - before == len(prompt) + K * M
        else:  # prompt + accepted prefix come from the cache: M new tokens per candidate
            assert cached.backbone_tokens - before == K * M
            assert seen[-1] == M
    assert max(seen[1:]) <= M  # no pass after the prompt's saw more than one block


def test_pairs_of_different_prompts_in_one_batch(checkpoints):
    cached, plain = pair(checkpoints["fudge"])
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 9))] for _ in range(3)]
    pairs = [(p, [rng.randrange(3, VOCAB) for _ in range(rng.randint(0, 6))])
             for p in prompts for _ in range(3)]
    first = cached.score_ids_pairs(pairs)
    want = [plain.score_ids(p, [r])[0] for p, r in pairs]
    assert first == pytest.approx(want, abs=1e-5)
    # again, now mostly from the cache (and extended by one token each)
    longer = [(p, r + [5]) for p, r in pairs]
    assert cached.score_ids_pairs(longer) == pytest.approx(
        [plain.score_ids(p, [r])[0] for p, r in longer], abs=1e-5)


def test_tokenwise_q_values_cost_one_token_per_step(checkpoints):
    cached, plain = pair(checkpoints["cdq"])
    prompt, response, cands = [9, 8, 7, 6], [], [3, 4, 5, 60]
    for step in range(5):
        before = cached.backbone_tokens
        got = cached.q_values(prompt, response, cands)
        assert got == pytest.approx(plain.q_values(prompt, response, cands), abs=1e-5)
        if step >= 2:
            assert cached.backbone_tokens - before == 1
        response = response + [cands[step % len(cands)]]


def test_a_small_cache_evicts_and_stays_exact(checkpoints):
    cached, plain = pair(checkpoints["cdq"], cache_tokens=10)
    for prompt, accepted, cands in block_rounds(seed=5, blocks=4):
        seqs = [accepted + c for c in cands] + [[]]
        assert cached.score_ids(prompt, seqs) == pytest.approx(plain.score_ids(prompt, seqs),
                                                               abs=1e-5)
    assert cached._backbone.cache.tokens <= 10


def test_a_batch_of_several_requests_computes_each_shared_prefix_once(checkpoints):
    cached, plain = pair(checkpoints["fudge"])
    system = [11, 12, 13, 14]  # what every chat-templated prompt starts with
    prompts = [system + [20, 21, 22], system + [30, 31]]
    rng = random.Random(9)
    pairs = [(p, [rng.randrange(40, VOCAB) for _ in range(M)]) for p in prompts for _ in range(K)]
    before = cached.backbone_tokens
    assert cached.score_ids_pairs(pairs) == pytest.approx(
        [plain.score_ids(p, [r])[0] for p, r in pairs], abs=1e-5)
    distinct = len(system) + 3 + 2 + 2 * K * M  # each token of the trie once
    assert cached.backbone_tokens - before == distinct
