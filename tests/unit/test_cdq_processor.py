"""The in-engine CD-Q tilt (heads/processor.py, heads/incremental.py): the tilt and its KL
by hand, per-request state under BatchUpdate's removed/added/moved, the step records, the
incremental head against a full forward, and tokenwise_cd's one-request-per-answer path.

BatchUpdate and MoveDirectionality are minimal stand-ins with vLLM's field and member names
(importing vllm takes ~30 s here); the integration tests run the real processor in vLLM.
"""

from __future__ import annotations

import asyncio
import enum
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from decoding.context import DecodeContext
from decoding.request import DecodeRequest
from decoding.strategies import STRATEGIES
from decoding.types import SampleDelta, Sampling
from heads.processor import (
    ENV_HEADS,
    CdqTilt,
    TiltArgs,
    check_request,
    read_steps,
    stats_path,
    tilt_rows,
)
from tests.unit.fakes import EOS, WORDS, FakeEngine, FakeQHead

V = 6
KEY_A, KEY_B, KEY_C = "a" * 32, "b" * 32, "c" * 32


class Move(enum.Enum):  # vllm.v1.sample.logits_processor.interface.MoveDirectionality
    UNIDIRECTIONAL = enum.auto()
    SWAP = enum.auto()


@dataclass(frozen=True)
class Update:  # vllm.v1.sample.logits_processor.interface.BatchUpdate
    batch_size: int
    removed: list
    added: list
    moved: list


def params(key: str | None = None, lam: float = 1.0, temperature: float = 1.0, head="value:q"):
    extra = TiltArgs(head, lam, key).extra_args() if key else None
    return SimpleNamespace(extra_args=extra, temperature=temperature)


class FakeSlot:
    def __init__(self, head: TableHead, key: str) -> None:
        self.head, self.key = head, key

    def release(self) -> None:
        self.head.released.append(self.key)


class TableHead:
    """Q(x, yᵗ, z) = table[z] + 0.1·t (t = tokens seen): values that move with the prefix."""

    vocab_size = V

    def __init__(self) -> None:
        self.table = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, -0.5])
        self.batches: list[list[int]] = []  # unseen-token counts of every step call
        self.released: list[str] = []  # keys of the requests whose slot was given back

    def q_of(self, seen: int) -> torch.Tensor:
        return self.table + 0.1 * seen

    def step(self, reqs, logits=None) -> torch.Tensor:
        self.batches.append([len(r.unseen()) for r in reqs])
        for r in reqs:
            r.seen += len(r.unseen())
            r.cache = r.cache or FakeSlot(self, r.args.key)
        return torch.stack([self.q_of(r.seen) for r in reqs])


def make(tmp_path) -> tuple[CdqTilt, TableHead]:
    head = TableHead()
    return CdqTilt(heads={"value:q": head}, stats_dir=str(tmp_path)), head


# ------------------------------------------------------------------------ the tilt by hand

def test_tilt_is_log_p_T_plus_lambda_q_and_its_kl_is_the_hand_sum():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5, -math.inf, 2.0]])
    q, lam, T = torch.tensor([[0.3, -0.2, 1.0, 0.0, 5.0, -1.0]]), 1.5, 0.7
    raw = logits.clone()
    kl, bound = tilt_rows(logits, q, torch.tensor([lam]), torch.tensor([T]))
    # what vLLM samples from after dividing by T
    got = torch.log_softmax(logits / T, -1)
    want = torch.log_softmax(torch.log_softmax(raw / T, -1) + lam * q, -1)
    assert torch.allclose(got[0, :4], want[0, :4], atol=1e-6) and got[0, 4] == -math.inf
    # KL(π‖p_T) = Σ π (log π − log p_T), by hand over the allowed tokens
    a = [x / T for x in (1.0, 0.0, -1.0, 0.5, 2.0)]
    b = [x + lam * v for x, v in zip(a, (0.3, -0.2, 1.0, 0.0, -1.0))]
    za, zb = sum(math.exp(x) for x in a), sum(math.exp(x) for x in b)
    hand = sum(math.exp(y) / zb * ((y - math.log(zb)) - (x - math.log(za))) for x, y in zip(a, b))
    assert kl.item() == pytest.approx(hand, rel=1e-5)
    assert bound.item() == pytest.approx(lam * (1.0 - (-1.0)))  # the masked token's 5.0 is out
    assert 0 <= kl.item() <= bound.item()


def test_lambda_zero_leaves_logits_bit_identical():
    logits = torch.randn(2, V)
    raw = logits.clone()
    kl, _ = tilt_rows(logits, torch.randn(2, V), torch.zeros(2), torch.tensor([1.0, 0.5]))
    assert torch.equal(logits, raw) and kl.tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------ state and apply

def test_apply_tilts_selected_rows_only_and_records_each_step(tmp_path):
    tilt, head = make(tmp_path)
    out_a, out_c = [], []
    tilt.update_state(Update(3, [], [(0, params(KEY_A, lam=2.0, temperature=0.5), [1, 2], out_a),
                                     (1, params(), [3], []),
                                     (2, params(KEY_C, lam=1.0), [4, 5, 1], out_c)], []))
    logits = torch.randn(3, V)
    raw = logits.clone()
    tilt.apply(logits)
    assert torch.equal(logits[1], raw[1])  # not asking for the tilt: untouched
    assert torch.allclose(logits[0], raw[0] + 0.5 * 2.0 * head.q_of(2))  # T·λ·Q
    assert torch.allclose(logits[2], raw[2] + 1.0 * 1.0 * head.q_of(3))
    assert head.batches == [[2, 3]]  # the prompts, then one token each step
    out_a.append(3)
    out_c.append(0)
    tilt.update_state(None)  # vLLM: no membership change, the live lists grew
    logits2 = torch.randn(3, V)
    raw2 = logits2.clone()
    tilt.apply(logits2)
    assert head.batches[-1] == [1, 1]
    kls, bounds = read_steps(tmp_path, KEY_A)
    assert len(kls) == 2 and bounds == pytest.approx([2.0 * 3.0] * 2)  # λ·(max − min)
    for step, (row, seen) in enumerate(((raw[0], 2), (raw2[0], 3))):
        a = torch.log_softmax(row / 0.5, -1)
        pi = torch.softmax(a + 2.0 * head.q_of(seen), -1)
        assert kls[step] == pytest.approx(float((pi * (pi.log() - a)).sum()), rel=1e-4, abs=1e-6)


def test_state_follows_removed_added_moved(tmp_path):
    tilt, head = make(tmp_path)
    tilt.update_state(Update(3, [], [(0, params(KEY_A), [1], []), (1, params(KEY_B), [2], []),
                                     (2, params(KEY_C), [3], [])], []))
    tilt.apply(torch.zeros(3, V))  # opens the three record files
    fds = {k: tilt.reqs[i].fd for i, k in enumerate((KEY_A, KEY_B, KEY_C))}
    # B leaves; vLLM condenses: C moves 2 → 1 (one way); then A and C swap
    tilt.update_state(Update(2, [1], [], [(2, 1, Move.UNIDIRECTIONAL)]))
    assert {i: r.args.key for i, r in tilt.reqs.items()} == {0: KEY_A, 1: KEY_C}
    with pytest.raises(OSError):
        os.fstat(fds[KEY_B])  # the leaver's file is closed, its slot given back
    assert head.released == [KEY_B]
    tilt.update_state(Update(2, [], [], [(0, 1, Move.SWAP)]))
    assert {i: r.args.key for i, r in tilt.reqs.items()} == {0: KEY_C, 1: KEY_A}
    # an added request replaces whatever sat at its index; one without the tilt clears it
    tilt.update_state(Update(2, [], [(0, params(), [9], [])], []))
    assert {i: r.args.key for i, r in tilt.reqs.items()} == {1: KEY_A}
    with pytest.raises(OSError):
        os.fstat(fds[KEY_C])
    tilt.close()
    assert tilt.reqs == {} and head.released == [KEY_B, KEY_C, KEY_A]


def test_a_re_added_request_reprefills_and_its_records_keep_their_steps(tmp_path):
    tilt, head = make(tmp_path)
    out = [7, 8]  # preempted after two tokens, re-added: the head sees prompt + both at once
    tilt.update_state(Update(1, [], [(0, params(KEY_A), [1, 2, 3], out)], []))
    tilt.apply(torch.zeros(1, V))
    assert head.batches == [[5]]
    with open(stats_path(tmp_path, KEY_A), "ab") as fh:  # the steps before the preemption
        from heads.processor import _RECORD
        fh.write(_RECORD.pack(0, 0.25, 1.0) + _RECORD.pack(1, 0.5, 1.0))
    kls, _ = read_steps(tmp_path, KEY_A)
    assert len(kls) == 3 and kls[:2] == [0.25, 0.5]


def test_requests_are_checked_at_the_engine_edge(monkeypatch):
    monkeypatch.setenv(ENV_HEADS, '{"value:q": "/nowhere"}')
    check_request(None, n=4, temperature=0.0)  # not tilted: anything goes
    check_request(TiltArgs("value:q", 1.0, KEY_A).extra_args(), n=1, temperature=1.0)
    check_request(TiltArgs("value:q", 1.0, KEY_A, policy_logits=True).extra_args(), n=1,
                  temperature=1.0)
    bad = [({"cdq": {"head": "value:x", "lambda": 1.0, "key": KEY_A}}, 1, 1.0, "not a CD-Q"),
           ({"cdq": {"head": "value:q", "lambda": -1, "key": KEY_A}}, 1, 1.0, "lambda"),
           ({"cdq": {"head": "value:q", "lambda": math.nan, "key": KEY_A}}, 1, 1.0, "lambda"),
           ({"cdq": {"head": "value:q", "lambda": 1, "key": "../etc"}}, 1, 1.0, "key"),
           ({"cdq": {"head": "value:q", "lambda": 1, "key": KEY_A, "policy_logits": "yes"}}, 1,
            1.0, "policy_logits"),
           (TiltArgs("value:q", 1.0, KEY_A).extra_args(), 2, 1.0, "n = 1"),
           (TiltArgs("value:q", 1.0, KEY_A).extra_args(), 1, 0.0, "greedy")]
    for extra, n, t, fragment in bad:
        with pytest.raises(ValueError, match=fragment):
            check_request(extra, n=n, temperature=t)


# ------------------------------------------------------------------------ the incremental head

def _tiny_backbone(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "qwen2":  # biased q/k/v projections, the other layout the tilt decodes
        return Qwen2ForCausalLM(Qwen2Config(**sizes, use_sliding_window=False))
    return LlamaForCausalLM(LlamaConfig(**sizes))


def _save_tiny_head(root, kind: str):
    from heads.model import HeadConfig, ValueHead, save_checkpoint

    torch.manual_seed(0)
    lm = _tiny_backbone(kind).eval()
    lm.save_pretrained(root / "lm")
    head = ValueHead("cdq", 32, 50)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    save_checkpoint(root / "head", head, HeadConfig("cdq", str(root / "lm"), str(root / "lm"),
                                                    32, 50, reward_mean=0.3, reward_std=2.0))
    return root / "head", lm, head


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory):
    return _save_tiny_head(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.mark.parametrize(("kind", "dtype"), [("llama", torch.float32), ("qwen2", torch.float32),
                                             ("llama", torch.bfloat16)])
def test_incremental_q_equals_a_full_forward_as_requests_come_and_go(tmp_path, kind, dtype):
    """float32: equal to transformers' forward; bfloat16 (the engine's dtype on CPUs that have
    it): within bfloat16's rounding of the float32 values."""
    from heads.incremental import IncrementalQ
    from heads.model import hidden_states, pad_batch
    from heads.processor import _Req
    from heads.slots import SlotCache

    folder, lm, head = _save_tiny_head(tmp_path, kind)
    inc = IncrementalQ(folder, dtype=dtype)
    # start small: the slot buffers must grow in both slots and positions on the way
    inc.kv = SlotCache(2, 2, 8, dtype=torch.float32, device=torch.device("cpu"), slots=1,
                       capacity=4)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11], [12]]
    reqs = [_Req(TiltArgs("h", 1.0, KEY_A), p, [], 1.0) for p in prompts]
    live = list(reqs)
    for step in range(7):
        if step == 3:  # request 1 leaves: the last slot moves into its row
            reqs[1].close()
            live.remove(reqs[1])
        # steps 2 and 5 leave some live requests out: their rows get a placeholder
        active = {2: live[:2], 5: live[1:]}.get(step, live)
        q = inc.step(active)
        seqs = [r.prompt + r.output for r in active]
        ids, mask = pad_batch(seqs)
        with torch.inference_mode():
            h = hidden_states(lm, ids, mask)
            last = torch.tensor([len(s) - 1 for s in seqs])
            ref = head.q_all(h[torch.arange(len(seqs)), last]) * 2.0 + 0.3
        tol = 1e-4 if dtype == torch.float32 else 0.02 * float(ref.abs().max())
        assert q.dtype == torch.float32 and torch.allclose(q, ref, atol=tol), step
        for i, r in enumerate(active):
            r.output.append((step * 7 + i) % 50)
    assert [s.index for s in inc.kv.slots] == [0, 1, 2] and inc.kv.capacity >= 12
    for r in live:
        r.close()
    assert inc.kv.slots == [] and inc.kv.capacity == 4  # the burst's memory is given back


def test_a_head_on_the_policys_backbone_reads_its_hidden_state_from_the_logits(tmp_path):
    """h = W⁺·l: rows whose raw logits are the policy's W·h need no backbone step (no KV slot is
    taken) and give transformers' Q; a masked row, or a request marked policy_logits = false,
    takes the incremental path and still gives the same Q."""
    from heads.incremental import IncrementalQ
    from heads.model import hidden_states, pad_batch
    from heads.processor import _Req

    folder, lm, head = _save_tiny_head(tmp_path, "llama")
    assert not IncrementalQ(folder).shares_policy  # no policy named
    assert not IncrementalQ(folder, policy=str(tmp_path)).shares_policy  # another checkpoint
    inc = IncrementalQ(folder, policy=str(tmp_path / "lm"))
    assert inc.shares_policy
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    reqs = [_Req(TiltArgs("h", 1.0, KEY_A, policy_logits=shared), p, [], 1.0)
            for p, shared in zip(prompts, (True, True, False))]
    for step in range(3):
        seqs = [r.prompt + r.output for r in reqs]
        ids, mask = pad_batch(seqs)
        with torch.inference_mode():
            last = torch.tensor([len(s) - 1 for s in seqs])
            h = hidden_states(lm, ids, mask)[torch.arange(len(seqs)), last]
            ref = head.q_all(h) * 2.0 + 0.3
            logits = lm.lm_head(h).float()
            if step == 1:
                logits[1, 7] = -math.inf  # e.g. min_tokens masking EOS: not W·h any more
        q = inc.step(reqs, logits)
        assert torch.allclose(q, ref, atol=1e-4), step
        assert reqs[0].cache is None  # never needed the backbone
        # the masked row took a slot for its step; back on the direct path it gave it back
        assert (reqs[1].cache is None) == (step != 1) and reqs[2].cache is not None
        for i, r in enumerate(reqs):
            r.output.append((step * 5 + i) % 50)
    for r in reqs:
        r.close()


def test_backbones_the_tilt_cannot_decode_are_refused():
    from transformers import GPT2Config, MistralConfig

    from heads.incremental import _check_layout

    with pytest.raises(ValueError, match="backbone is 'gpt2'"):
        _check_layout("h", GPT2Config())
    with pytest.raises(ValueError, match="sliding window"):
        _check_layout("h", MistralConfig(sliding_window=16, max_position_embeddings=128))
    _check_layout("h", MistralConfig(sliding_window=None))


def test_a_head_with_another_vocabulary_is_refused(tiny_head):
    from heads.incremental import load_engine_heads

    with pytest.raises(ValueError, match="vocabulary of 50 tokens, the policy 49152"):
        load_engine_heads({"value:tiny": str(tiny_head[0])}, 49152, "cpu")


# ------------------------------------------------------------------------ tokenwise_cd's path

class TiltingFake(FakeEngine):
    """FakeEngine plus `tilted`: streams one uniform sample, with made-up step KLs."""

    tilt_heads = frozenset({"value:q"})

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.tilts: list = []

    async def tilted(self, prompt_ids, sampling: Sampling, tilt):
        self.tilts.append(tilt)
        s = (await self.generate(prompt_ids, 1, sampling))[0]
        for k, tok in enumerate(s.token_ids):
            last = k == len(s.token_ids) - 1
            kl = [0.01 * (i + 1) for i in range(len(s.token_ids))] if last else None
            yield SampleDelta(0, [tok], " " + WORDS[tok], [s.logprobs[k]],
                              s.finish_reason if last else None, step_kl=kl,
                              step_kl_bound=[1.0] * len(s.token_ids) if last else None)


def request(options, emit=None, max_tokens=12):
    return DecodeRequest(prompt_ids=[1, 2], prompt_text="hi", seed=3,
                         options=STRATEGIES["tokenwise_cd"].Options.model_validate(options),
                         sampling=Sampling(max_tokens=max_tokens, seed=3), value=FakeQHead({}),
                         emit=emit)


async def test_tokenwise_uses_one_tilted_engine_request_per_answer():
    engine, pieces = TiltingFake(full_length=True), []
    res = await STRATEGIES["tokenwise_cd"].run(request({"lambda": 2.0}, pieces.append),
                                               DecodeContext(engine))
    assert engine.started == 1 and engine.tilts[0].lam == 2.0 and engine.tilts[0].head == "value:q"
    steps = len(res.sample.token_ids)
    assert steps == 12 and res.extra["in_engine"] and res.extra["steps"] == steps
    assert res.kl_estimate == pytest.approx(sum(0.01 * (i + 1) for i in range(steps)))
    # FakeQHead certifies no value range: no bound on KL(π‖p); the path's own bound moved
    assert res.kl_bound is None and res.extra["kl_path_bound"] == pytest.approx(steps)
    assert res.scored_candidates == 0
    assert "".join(pieces) == res.sample.text == engine.decode(res.sample.token_ids)
    assert len(pieces) == steps  # streamed token by token


async def test_top_k_or_an_unloaded_head_falls_back_to_the_per_token_round_trip():
    engine = TiltingFake()
    engine.next_logprobs = {0: math.log(0.5), 1: math.log(0.5), EOS: -9.0}
    res = await STRATEGIES["tokenwise_cd"].run(request({"lambda": 1.0, "top_k": 2}, max_tokens=3),
                                               DecodeContext(engine))
    assert not engine.tilts and not res.extra["in_engine"] and engine.started == res.extra["steps"]
    plain = FakeEngine()
    plain.next_logprobs = engine.next_logprobs
    res = await STRATEGIES["tokenwise_cd"].run(request({"lambda": 1.0}, max_tokens=3),
                                               DecodeContext(plain))
    assert res.extra["top_k"] == 10 and not res.extra["in_engine"]


async def test_cancelling_a_tilted_answer_aborts_its_engine_request():
    engine = TiltingFake()
    engine.gate = asyncio.Event()
    task = asyncio.create_task(STRATEGIES["tokenwise_cd"].run(request({"lambda": 1.0}),
                                                              DecodeContext(engine)))
    while engine.active == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.active == 0 and engine.cancelled == 1
