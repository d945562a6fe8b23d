"""Issue 26 item 4: the in-engine tilt samples exactly p_proc·exp(λQ) on p_proc's support.

vLLM runs the CD-Q processor before its penalties and its min_p / top_k / top_p, so a tilted
request carries those in `extra_args["cdq"]["p"]` and the processor applies them to p before
the tilt (heads/processor.py); vLLM's own copies must be off (`check_request`). Here the
processor's row is checked against a hand-written reference of vLLM's semantics (penalties,
temperature, min_p, top_k, top_p): the law vLLM then samples (softmax(row / T), nothing after)
is p_proc·exp(λQ)/Z with −inf outside p_proc's support, the recorded KL is KL(π‖p_proc), the
bound is λ·(max − min of Q over that support), and seeded draws follow the law.
"""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from test_cdq_processor import Update  # vLLM's BatchUpdate stand-in

from heads.processor import (
    ENV_HEADS,
    CdqTilt,
    PolicyControls,
    TiltArgs,
    check_request,
)

V = 8
KEY = "d" * 32
RAW = [2.0, 1.5, 0.9, 0.3, -0.2, -0.8, 1.1, -1.6]  # distinct: no ties at any cut
Q = [0.0, -0.5, 0.4, 0.2, -0.1, 6.0, 0.3, -0.3]  # token 5 (unlikely under p) is lifted hard
PROMPT = [0, 3, 3]
OUTPUT = [1, 0, 1]




class ConstHead:
    """A StepHead whose Q(x, yᵗ, ·) is the same row at every step."""

    vocab_size = V

    def step(self, reqs, logits=None):
        for r in reqs:
            r.seen += len(r.unseen())
        return torch.tensor([Q] * len(reqs))


def reference(c: PolicyControls, temperature: float, lam: float):
    """(log p_proc, log π) per token, −inf outside the support: vLLM's semantics by hand."""
    counts = Counter(OUTPUT)
    logits = []
    for z, x in enumerate(RAW):
        if c.repetition_penalty != 1.0 and (z in PROMPT or counts[z]):
            x = x / c.repetition_penalty if x > 0 else x * c.repetition_penalty
        x -= c.frequency_penalty * counts[z] + c.presence_penalty * (counts[z] > 0)
        logits.append(x / temperature)
    keep = set(range(V))
    if c.min_p > 0:
        probs = _softmax(logits, keep)
        keep = {z for z in keep if probs[z] >= c.min_p * max(probs.values())}
    if c.top_k > 0:
        kth = sorted((logits[z] for z in keep), reverse=True)[min(c.top_k, len(keep)) - 1]
        keep = {z for z in keep if logits[z] >= kth}
    if c.top_p < 1:
        probs = _softmax(logits, keep)
        ascending = sorted(keep, key=lambda z: logits[z])
        cum, dropped = 0.0, set()
        for z in ascending[:-1]:  # the most likely token always stays
            cum += probs[z]
            if cum <= 1 - c.top_p:
                dropped.add(z)
        keep -= dropped
    p = _softmax(logits, keep)
    pi = _softmax([logits[z] + lam * Q[z] for z in range(V)], keep)
    return ([math.log(p[z]) if z in keep else -math.inf for z in range(V)],
            [math.log(pi[z]) if z in keep else -math.inf for z in range(V)])


def _softmax(xs, keep):
    top = max(xs[z] for z in keep)
    w = {z: math.exp(xs[z] - top) for z in keep}
    total = math.fsum(w.values())
    return {z: v / total for z, v in w.items()}


def tilted_row(records: list, c: PolicyControls, temperature: float, lam: float
               ) -> torch.Tensor:
    """The row the processor hands back to vLLM for one tilted request; its step record
    (step, KL, bound) is appended to `records`."""
    tilt = CdqTilt(heads={"value:q": ConstHead()})
    tilt._record = lambda reqs, steps, kls, bounds: records.extend(zip(steps, kls, bounds))
    params = SimpleNamespace(extra_args=TiltArgs("value:q", lam, KEY, c).extra_args(),
                             temperature=temperature)
    tilt.update_state(Update(1, [], [(0, params, PROMPT, list(OUTPUT))], []))
    logits = torch.tensor([RAW])
    tilt.apply(logits)
    tilt.close()
    return logits[0]


CASES = [
    PolicyControls(repetition_penalty=1.3, top_p=0.8),
    PolicyControls(repetition_penalty=0.8, presence_penalty=0.5, frequency_penalty=0.3),
    PolicyControls(top_k=3),
    PolicyControls(min_p=0.2),
    PolicyControls(repetition_penalty=1.2, frequency_penalty=0.2, min_p=0.05, top_k=5,
                   top_p=0.7),
]


@pytest.mark.parametrize("c", CASES)
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_the_sampled_law_is_the_tilt_of_processed_p(c, temperature):
    lam, records = 1.5, []
    row = tilted_row(records, c, temperature, lam)
    log_p, log_pi = reference(c, temperature, lam)
    law = torch.log_softmax(row / temperature, -1)  # what vLLM samples: nothing changes it after
    support = [z for z in range(V) if math.isfinite(log_p[z])]
    assert [z for z in range(V) if math.isfinite(law[z])] == support
    for z in support:
        assert law[z].item() == pytest.approx(log_pi[z], abs=1e-5)
    # the recorded KL is KL(π‖p_proc) of that very row; the bound spans Q on the support only
    ((step, kl, bound),) = records
    assert step == len(OUTPUT)
    exact = math.fsum(math.exp(log_pi[z]) * (log_pi[z] - log_p[z]) for z in support)
    assert kl == pytest.approx(exact, abs=1e-5)
    spread = max(Q[z] for z in support) - min(Q[z] for z in support)
    assert bound == pytest.approx(lam * spread, abs=1e-6)


def test_the_tilt_cannot_lift_a_token_outside_the_nucleus():
    c = PolicyControls(top_p=0.6)
    records: list = []
    row = tilted_row(records, c, 1.0, 3.0)
    assert row[5].item() == -math.inf  # Q = 6 would make it the likeliest token
    assert math.isfinite(records[0][1])


def test_seeded_draws_follow_the_law():
    c = CASES[-1]
    row = tilted_row([], c, 0.7, 1.5)
    _, log_pi = reference(c, 0.7, 1.5)
    n = 20_000
    draws = torch.multinomial(torch.softmax(row / 0.7, -1), n, replacement=True,
                              generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=V).tolist()
    for z in range(V):
        p = math.exp(log_pi[z])
        assert abs(counts[z] / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_neutral_controls_leave_the_row_as_before():
    # no penalties or truncation: logits + T·λ·Q exactly, as before the fix
    row = tilted_row([], PolicyControls(), 0.5, 2.0)
    assert torch.allclose(row, torch.tensor(RAW) + 0.5 * 2.0 * torch.tensor(Q))
    assert "p" not in TiltArgs("h", 1.0, KEY).extra_args()["cdq"]


def test_controls_travel_in_extra_args():
    c = CASES[-1]
    args = TiltArgs.parse(TiltArgs("h", 1.0, KEY, c).extra_args(), ["h"])
    assert args is not None and args.p == c
    for bad in ({"top_p": 0.0}, {"repetition_penalty": 0.0}, {"min_p": 1.5}, {"top_k": 2.5},
                {"top_k": -2}, {"presence_penalty": 3.0}, {"temperature": 0.5},
                {"top_p": True}, {"top_p": math.nan}):
        with pytest.raises(ValueError, match="extra_args.cdq.p"):
            TiltArgs.parse({"cdq": {"head": "h", "lambda": 1.0, "key": KEY, "p": bad}}, ["h"])


def test_vllm_side_controls_are_refused_for_a_tilt(monkeypatch):
    monkeypatch.setenv(ENV_HEADS, '{"value:q": "/nowhere"}')
    extra = TiltArgs("value:q", 1.0, KEY).extra_args()
    off = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
           "min_p": 0.0, "top_k": 0, "top_p": 1.0}
    check_request(extra, 1, 1.0, off)
    check_request(extra, 1, 1.0, {**off, "top_k": -1})  # vLLM's other "off"
    check_request(None, 1, 1.0, {**off, "top_p": 0.5})  # not tilted: vLLM applies it
    for name, value in (("repetition_penalty", 1.2), ("presence_penalty", 0.5),
                        ("frequency_penalty", -0.5), ("min_p", 0.1), ("top_k", 5),
                        ("top_p", 0.9)):
        with pytest.raises(ValueError, match=f"{name} = {value} would be applied by vLLM after"):
            check_request(extra, 1, 1.0, {**off, name: value})
