"""Issue 26 item 4 on the real engine: with repetition_penalty and top_p set, the in-engine tilt
samples p_proc·exp(λQ) on p_proc's support, and reports the KL of that very law.

p_proc is recomputed here without the engine: the policy's logits from transformers (float32),
then vLLM's repetition penalty (tokens of the prompt and of the answer so far), temperature and
top_p, by hand; Q over the whole vocabulary from the head's own scorer (heads/scorer.py, a
full forward, not the engine's head). The head is `value:rand` of the session's heads server, a
CD-Q head with random token weights on the embedded backbone (live.random_cdq_head: no training
needed to check a law). Being on the served model's own backbone, the engine reads its hidden
state back from the policy's logits (heads/incremental.py), which this test checks too. Every
sampled token must lie in p_proc's nucleus, its log-prob as the engine reports it must be
log p_proc + λQ − log Σ_nucleus p_proc·e^{λQ}, and the per-step KL (`token_kl`) must be
KL(π‖p_proc). Tolerances allow for the engine's head running in
bfloat16 where the CPU supports it (heads/incremental.py: Q within ~0.02).
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import torch
from live import RANDOM_HEAD_TEMPERATURE

pytestmark = pytest.mark.integration

ASK = [{"role": "user", "content": "Name three fruits and say why they are healthy."}]
LAM, TOP_P, REPETITION = 1.5, 0.8, 1.3
TEMPERATURE = RANDOM_HEAD_TEMPERATURE  # the one the head was "trained" at


def _model_dir() -> Path:
    from runtime.startup import resolve_model

    return Path(resolve_model("embedded"))


def processed(logits: torch.Tensor, seen: list[int]) -> torch.Tensor:
    """log p_proc [V]: vLLM's repetition penalty, temperature, top_p; −inf outside the nucleus."""
    return _vllm_after_processors(logits.double(), seen)


def _vllm_after_processors(x: torch.Tensor, seen: list[int]) -> torch.Tensor:
    """What vLLM does to a raw row after the logits processors (penalty, temperature, top_p)."""
    x = x.clone()
    idx = torch.tensor(sorted(set(seen)))
    x[idx] = torch.where(x[idx] > 0, x[idx] / REPETITION, x[idx] * REPETITION)
    x = x / TEMPERATURE
    ascending, order = x.sort()
    drop = ascending.softmax(-1).cumsum(-1) <= 1 - TOP_P
    drop[-1] = False
    x[order[drop]] = -math.inf
    return x.log_softmax(-1)


def test_the_engine_samples_the_tilt_of_processed_p(heads_server, value_heads):
    random_head = value_heads["rand"]
    from transformers import AutoTokenizer

    from heads.model import load_causal_lm
    from heads.scorer import load_value_head

    model = _model_dir()
    tok = AutoTokenizer.from_pretrained(str(model))
    text = tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    prompt = list(tok(text, add_special_tokens=False)["input_ids"])
    body = {"prompt": prompt, "max_tokens": 10, "temperature": TEMPERATURE, "top_p": TOP_P,
            "repetition_penalty": REPETITION, "seed": 3, "logprobs": 0,
            "alignment": {"strategy": "tokenwise_cd", "lambda": LAM, "value": "value:rand",
                          "return_candidates": True}}
    r = httpx.post(f"{heads_server.base_url}/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    choice, info = r.json()["choices"][0], r.json()["alignment"]
    assert info["in_engine"], info
    pieces = choice["logprobs"]["tokens"]
    engine_lps = choice["logprobs"]["token_logprobs"]
    token_kl = info["token_kl"]
    assert len(pieces) == len(engine_lps) == len(token_kl) >= 3

    # the answer's token ids, from the pieces (each the decoding of one token id)
    wanted = set(pieces)
    by_text: dict[str, list[int]] = {}
    for i in range(len(tok)):
        text = tok.decode([i])
        if text in wanted:
            by_text.setdefault(text, []).append(i)

    lm = load_causal_lm(str(model))
    q_head = load_value_head(random_head, "rand")
    answer: list[int] = []
    tilt_moved = old_gap = 0.0
    for t, (piece, engine_lp, kl) in enumerate(zip(pieces, engine_lps, token_kl)):
        ids = prompt + answer
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([ids])).logits[0, -1].double()
        log_p = processed(logits, ids)
        q = torch.tensor(q_head.q_values(prompt, answer, list(range(len(log_p)))),
                         dtype=torch.float64)
        log_pi = (log_p + LAM * q).log_softmax(-1)
        options = [z for z in by_text.get(piece, []) if math.isfinite(log_p[z])]
        assert len(options) == 1, f"step {t}: {piece!r} is not one token of p_proc's nucleus"
        (z,) = options
        assert engine_lp == pytest.approx(float(log_pi[z]), abs=0.05), f"step {t}"
        support = torch.isfinite(log_p)
        pi = log_pi.exp()
        exact = float((pi[support] * (log_pi[support] - log_p[support])).sum())
        assert kl == pytest.approx(exact, abs=0.03, rel=0.05), f"step {t}"
        tilt_moved = max(tilt_moved, abs(float(log_pi[z] - log_p[z])))
        # before the fix: T·λ·Q added to the raw row, then vLLM's penalty and top_p on top
        before = _vllm_after_processors(logits + TEMPERATURE * LAM * q, ids)
        old_gap = max(old_gap, abs(engine_lp - float(before[z])))
        answer.append(z)
    # the check above has teeth: the tilt changed the law visibly, and the law sampled before
    # the fix gives these tokens log-probs the engine's do not match
    assert tilt_moved > 0.3 and old_gap > 0.1, (tilt_moved, old_gap)
