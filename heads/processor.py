"""Tokenwise CD-Q inside the engine: the logic of a vLLM logits processor (no vllm import here).

Mudgal et al. (ICML 2024, arXiv 2310.17022): the KL-regularised optimal next-token policy is
π*(z | x, yᵗ) ∝ p(z | x, yᵗ)·exp(λ·Q(x, yᵗ, z)). A vocabulary-sized CD-Q head (heads/model.py)
gives Q(x, yᵗ, ·) for every z in one forward pass, so the tilt covers the WHOLE vocabulary (no
top-k truncation) and costs one head step per generated token, batched across requests.

Data flow (one engine step):
    update_state(BatchUpdate)  requests that carry `extra_args["cdq"] = {"head", "lambda",
                               "key"}` get a `_Req` at their batch index (removed → added →
                               moved, exactly as vLLM orders them; see `CdqTilt.update_state`)
    apply(logits [B, V])       for those rows: feed the head's backbone the tokens it has not
                               seen (the prompt on the first step, then one token per step,
                               batched, with a per-request KV cache), Q [b, V] in reward units,
                               logits += T·λ·Q, and one step record (KL, bound) per request.

Temperature. vLLM applies processors that may change the argmax (this one) to the raw logits l,
*before* dividing by the request temperature T. The head's targets assume the processed policy
p_T = softmax(l/T) (valuenet/train.py divides by the rollouts' temperature), so we add T·λ·Q:
after vLLM's division the sampled distribution is softmax(l/T + λ·Q) = p_T(z)·exp(λ·Q)/Z — the
tilt of p_T, not of p_1.

Penalties and truncation (issue 26 item 4). vLLM's sampler (v1/sample/sampler.py) runs this
processor BEFORE the repetition / frequency / presence penalties and before min_p, top_k and
top_p: left to vLLM they would act on the tilted row, so the law sampled would not be a tilt of
p and the tilt could lift a token outside p's nucleus. So a tilted request carries p's
penalties and truncation in `extra_args["cdq"]["p"]` (`PolicyControls`), vLLM's own copies are
neutral (runtime/engine.py; `check_request` refuses a tilted request where they are not), and
the processor applies them here in vLLM's own order and semantics (`policy_row`): penalties on
the raw row, then, at temperature T, min_p, top_k, top_p. The sampled law is then exactly
π(z) ∝ p_proc(z)·exp(λ·Q(z)) on p_proc's support S (−∞ outside), p_proc the processed policy.

KL accounting. Each step t records KL(πₜ ‖ p_T,ₜ) = Σ_z πₜ(z)·λQ(z) − log Σ_z p_T,ₜ(z)·e^{λQ(z)},
computed from the same logits row that is sampled from, and the bound λ·(max Q − min Q) over the
tokens p_T allows (log π/p = λQ − log E_p e^{λQ} ≤ λ(max Q − min Q)). Summed along the decoded
path it is one path's Σₜ KL(πₜ‖pₜ); by the chain rule its expectation over paths is the
sequence-level KL(π‖p_T) (a Rao-Blackwellised single-path estimate), so it is an unbiased
estimate, not a bound. p is p_proc (after logit_bias and min_tokens, which vLLM applies
before this processor, and after the penalties and truncation applied here), and the KL and
the bound are computed from the very row that is sampled (nothing changes it afterwards).

Side channel. A logits processor runs in the engine's worker process and never learns the
request id, so the strategy puts a random `key` into `extra_args` and the processor appends one
fixed-size record (step, KL, bound) per step to `<stats dir>/<key>` (os.write on an O_APPEND
file: visible to the API process as soon as it returns, and it returns before the step's token
is even sampled, hence before the API can see that token). The engine reads the records when
the request finishes and deletes the file. Records carry their step index, so an extra step
(async scheduling, a stop string found by the detokenizer) or a preempted and re-added request
does not shift them; the latest record of a step wins.

Configuration reaches the worker through two environment variables that `runtime/engine.py` sets
before vLLM spawns its engine process (they are inherited; vLLM's `additional_config` would work
too but enters the compile-cache hash, so a new set of heads would recompile the policy graph).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)
ENV_HEADS = "ALIGNSERVE_CDQ_HEADS"  # JSON {head name: checkpoint folder}
ENV_STATS = "ALIGNSERVE_CDQ_STATS"  # folder of per-request step records
EXTRA = "cdq"  # the SamplingParams.extra_args entry that asks for the tilt
_RECORD = struct.Struct("<idd")  # step, KL(πₜ‖pₜ), bound of that step
_KEY = re.compile(r"^[0-9a-f]{16,64}$")
_MIN_T = 1e-5  # vLLM's greedy threshold: below it vLLM divides by 1, not by T


# ------------------------------------------------------------------------ request arguments

# vLLM's "off" value of each control that it would apply AFTER this processor (sampler.py).
CONTROLS_NEUTRAL: dict[str, Any] = {"repetition_penalty": 1.0, "presence_penalty": 0.0,
                                      "frequency_penalty": 0.0, "min_p": 0.0, "top_k": 0,
                                      "top_p": 1.0}


def _is_neutral(name: str, value: Any) -> bool:
    return value <= 0 if name == "top_k" else value == CONTROLS_NEUTRAL[name]  # top_k −1: off


@dataclass(frozen=True)
class PolicyControls:
    """p's penalties and truncation, which the processor applies before the tilt (module
    docstring) with vLLM's semantics; neutral values are off."""

    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def neutral(self) -> bool:
        return all(_is_neutral(k, getattr(self, k)) for k in CONTROLS_NEUTRAL)

    @classmethod
    def parse(cls, spec: Any) -> PolicyControls:
        """From `extra_args["cdq"]["p"]` (absent: all off); ValueError with vLLM's bounds."""
        if spec is None:
            return cls()
        if not isinstance(spec, dict) or set(spec) - set(CONTROLS_NEUTRAL):
            raise ValueError(f"extra_args.{EXTRA}.p must be an object with some of "
                             f"{', '.join(CONTROLS_NEUTRAL)}")
        for name, value in spec.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
                    math.isfinite(value):
                raise ValueError(f"extra_args.{EXTRA}.p.{name} must be a finite number")
        c = cls(**{**asdict(cls()), **spec})
        if not (c.repetition_penalty > 0 and -2 <= c.presence_penalty <= 2
                and -2 <= c.frequency_penalty <= 2 and 0 <= c.min_p <= 1
                and 0 < c.top_p <= 1 and int(c.top_k) == c.top_k and c.top_k >= -1):
            raise ValueError(f"extra_args.{EXTRA}.p: a control is out of vLLM's bounds: {spec}")
        return c


@dataclass(frozen=True)
class TiltArgs:
    """What one request asks for: head name, λ ≥ 0, the key of its step records, p's penalties
    and truncation (applied before the tilt), and whether the engine's raw logits for it are
    the policy's own unembedding of its hidden state (`policy_logits`: no LoRA adapter, no
    logit_bias), so that a head on the policy's backbone may read its hidden state back from
    them (heads/incremental.py, `IncrementalQ.step`)."""

    head: str
    lam: float
    key: str
    p: PolicyControls = PolicyControls()
    policy_logits: bool = False

    def extra_args(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"head": self.head, "lambda": self.lam, "key": self.key}
        if not self.p.neutral:
            spec["p"] = asdict(self.p)
        if self.policy_logits:
            spec["policy_logits"] = True
        return {EXTRA: spec}

    @classmethod
    def parse(cls, extra_args: dict | None, heads: Sequence[str]) -> TiltArgs | None:
        """None when the request does not ask for a tilt; ValueError when it asks wrongly."""
        spec = (extra_args or {}).get(EXTRA)
        if spec is None:
            return None
        if not isinstance(spec, dict):
            # ValueError, not TypeError: vLLM turns a ValueError from validate_params into a 400
            raise ValueError(f"extra_args.{EXTRA} must be an object with head, lambda and key")  # noqa: TRY004
        head, lam, key = spec.get("head"), spec.get("lambda"), spec.get("key")
        if head not in heads:
            raise ValueError(f"extra_args.{EXTRA}.head {head!r} is not a CD-Q head loaded in the "
                             f"engine (loaded: {', '.join(sorted(heads)) or 'none'})")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (
                math.isfinite(lam) and lam >= 0):
            raise ValueError(f"extra_args.{EXTRA}.lambda must be a finite number ≥ 0")
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"extra_args.{EXTRA}.key must be 16-64 lowercase hex digits")
        shared = spec.get("policy_logits", False)
        if not isinstance(shared, bool):
            raise ValueError(f"extra_args.{EXTRA}.policy_logits must be true or false")
        return cls(head, float(lam), key, PolicyControls.parse(spec.get("p")), shared)


def check_request(extra_args: dict | None, n: int, temperature: float,
                  controls: dict[str, Any] | None = None) -> None:
    """The engine-edge check (vLLM's validate_params, in the API process): a ValueError here is
    a 400, never a failure inside the worker's step. `controls`: the request's own vLLM-side
    penalties and truncation, which must be off for a tilt (vLLM would apply them after it)."""
    args = TiltArgs.parse(extra_args, list(configured_heads()))
    if args is None:
        return
    for name, value in (controls or {}).items():
        if not _is_neutral(name, value):
            raise ValueError(f"extra_args.{EXTRA}: {name} = {value} would be applied by vLLM "
                             f"after the tilt; pass it in extra_args.{EXTRA}.p, which applies "
                             "it to p before the tilt")
    if n != 1:
        raise ValueError(f"extra_args.{EXTRA}: one tilted sample per request (n = 1), got n = {n}")
    if temperature < _MIN_T:
        raise ValueError(f"extra_args.{EXTRA}: the tilt samples from p_T·exp(λQ); greedy "
                         "decoding (temperature 0) is not supported")


def configured_heads() -> dict[str, str]:
    """The heads named for this engine (ENV_HEADS), name → checkpoint folder."""
    raw = os.environ.get(ENV_HEADS)
    return dict(json.loads(raw)) if raw else {}


# ------------------------------------------------------------------------ step records

def stats_path(folder: str | Path, key: str) -> Path:
    if not _KEY.match(key):
        raise ValueError(f"bad record key {key!r}")
    return Path(folder) / key


def read_steps(folder: str | Path, key: str) -> tuple[list[float], list[float]]:
    """(KL per step, bound per step) for steps 0, 1, ... as far as they are contiguous."""
    try:
        data = stats_path(folder, key).read_bytes()
    except FileNotFoundError:
        return [], []
    by_step: dict[int, tuple[float, float]] = {}
    usable = len(data) - len(data) % _RECORD.size
    for step, kl, bound in _RECORD.iter_unpack(data[:usable]):
        by_step[step] = (kl, bound)  # a re-computed step (re-added request): the latest wins
    kls, bounds = [], []
    while len(kls) in by_step:
        kl, bound = by_step[len(kls)]
        kls.append(kl)
        bounds.append(bound)
    return kls, bounds


def drop_steps(folder: str | Path, key: str) -> None:
    try:
        stats_path(folder, key).unlink()
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------ the tilt itself

def tilt_rows(logits: torch.Tensor, q: torch.Tensor, lam: torch.Tensor, temp: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tilt raw logits rows in place and return (KL(π‖p_T), bound) per row.

    logits [b, V] (raw, before temperature; −inf = masked), q [b, V] in reward units,
    lam [b], temp [b]. Afterwards softmax(logits / T) = softmax(l/T + λQ) (module docstring).
    """
    temp = torch.where(temp < _MIN_T, torch.ones_like(temp), temp)  # as vLLM divides
    a = logits / temp[:, None]  # log p_T up to a constant
    lq = lam[:, None] * q
    b = a + lq
    lse_a, lse_b = a.logsumexp(-1), b.logsumexp(-1)
    pi = (b - lse_b[:, None]).exp()  # 0 where the logit is −inf
    kl = ((pi * lq).sum(-1) - (lse_b - lse_a)).clamp_min(0.0)
    allowed = torch.isfinite(logits)
    spread = (q.masked_fill(~allowed, -math.inf).amax(-1)
              - q.masked_fill(~allowed, math.inf).amin(-1))
    bound = (lam * spread).clamp_min(0.0)
    logits.add_((temp * lam)[:, None] * q)
    return kl, bound


def policy_row(row: torch.Tensor, prompt: Sequence[int], output: Sequence[int],
               c: PolicyControls, temperature: float) -> torch.Tensor:
    """p's penalties and truncation on one raw row [V] (float32), as vLLM applies them after
    the processors (vllm/v1/sample: ops/penalties.py, logits_processor/builtin.py MinP,
    ops/topk_topp_sampler.py), returned in raw units with −inf outside p_proc's support:
    repetition (tokens of prompt or output: l/r where l > 0, else l·r), frequency (−f·count in
    the output), presence (−pres·[in the output]); then at temperature T: min_p (probability
    < min_p·max), top_k (below the k-th largest; ties kept), top_p (ascending cumulative mass
    ≤ 1 − top_p, the largest always kept)."""
    vocab = row.shape[0]
    if not (_is_neutral("repetition_penalty", c.repetition_penalty)
            and c.presence_penalty == 0 and c.frequency_penalty == 0):
        # async scheduling may leave −1 placeholders in the live output list
        out = torch.tensor([t for t in output if 0 <= t < vocab], dtype=torch.long)
        counts = torch.bincount(out, minlength=vocab).to(row.dtype)
        seen = counts > 0
        if c.repetition_penalty != 1.0:
            both = seen.clone()
            both[torch.tensor([t for t in prompt if 0 <= t < vocab], dtype=torch.long)] = True
            pen = torch.where(both, torch.tensor(c.repetition_penalty, dtype=row.dtype),
                              torch.ones((), dtype=row.dtype))
            row = row * torch.where(row > 0, 1.0 / pen, pen)
        row = row - c.frequency_penalty * counts - c.presence_penalty * seen.to(row.dtype)
    if all(_is_neutral(k, getattr(c, k)) for k in ("min_p", "top_k", "top_p")):
        return row
    a = row / (1.0 if temperature < _MIN_T else temperature)
    if c.min_p > 0:
        probs = a.softmax(-1)
        a = a.masked_fill(probs < c.min_p * probs.amax(), -math.inf)
    if 0 < c.top_k < vocab:
        a = a.masked_fill(a < a.topk(int(c.top_k)).values[-1], -math.inf)
    if c.top_p < 1:
        ascending, order = a.sort()
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - c.top_p
        drop[-1] = False  # at least one
        a = a.masked_fill(torch.zeros_like(drop).scatter_(0, order, drop), -math.inf)
    return row.masked_fill(~torch.isfinite(a), -math.inf)


# ------------------------------------------------------------------------ per-request state

@dataclass
class _Req:
    """A tilted request at one batch index. `output` is vLLM's live list of its output ids."""

    args: TiltArgs
    prompt: list[int]
    output: list[int]
    temperature: float
    seen: int = 0  # tokens of prompt + output the head's KV cache holds
    cache: Any = None  # the head's per-request KV slot (owned by the head; has release())
    fd: int | None = None  # the step-record file, opened on the first record

    def unseen(self) -> list[int]:
        """The tokens the head has not consumed yet (prompt first, then outputs)."""
        p = len(self.prompt)
        if self.seen >= p:
            return list(self.output[self.seen - p:])
        return self.prompt[self.seen:] + list(self.output)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.cache is not None:
            self.cache.release()  # the head's slot goes back to its pool
            self.cache = None


class StepHead(Protocol):
    """A CD-Q head that advances requests' caches: Q(x, yᵗ, ·) [b, V] in reward units for the
    requests given, after consuming each one's unseen tokens (heads.incremental). `logits`:
    those requests' rows as the engine computed them [b, V] float32, before any tilt, penalty
    or truncation of this processor (a head on the policy's backbone may read them instead of
    running its own)."""

    vocab_size: int

    def step(self, reqs: Sequence[_Req], logits: torch.Tensor) -> torch.Tensor: ...


@dataclass
class CdqTilt:
    """The logits processor's state machine and apply; `runtime/cdq_plugin.py` binds it to
    vLLM's LogitsProcessor base class. `heads` name → StepHead; `stats_dir` receives records."""

    heads: dict[str, StepHead]
    stats_dir: str | None = None
    reqs: dict[int, _Req] = field(default_factory=dict)  # batch index → tilted request
    recording_failed: bool = False  # a record write failed (disk full...): records are off

    def is_argmax_invariant(self) -> bool:
        return False  # the tilt changes the argmax; this also places it before temperature

    def update_state(self, batch_update) -> None:
        """Follow vLLM's order: removed, then added (which may replace an index), then moved
        (UNIDIRECTIONAL a → b empties a; SWAP exchanges a and b)."""
        if not batch_update:
            return  # no change of membership; the live output lists grew by themselves
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self._drop(index)
            args = TiltArgs.parse(getattr(params, "extra_args", None), list(self.heads))
            if args is None:
                continue
            if prompt_ids is None:
                raise ValueError("the CD-Q tilt needs the prompt's token ids (no embeddings)")
            self.reqs[index] = _Req(args, list(prompt_ids), output_ids,
                                    float(params.temperature))
        for a, b, direction in batch_update.moved:
            ra, rb = self.reqs.pop(a, None), self.reqs.pop(b, None)
            if ra is not None:
                self.reqs[b] = ra
            if rb is not None:
                if _is_swap(direction):
                    self.reqs[a] = rb
                else:  # a one-way move overwrites b: whatever sat there has left
                    rb.close()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = sorted(i for i in self.reqs if i < logits.shape[0])
        by_head: dict[str, list[int]] = {}
        for i in rows:
            by_head.setdefault(self.reqs[i].args.head, []).append(i)
        for name, idx in by_head.items():
            reqs = [self.reqs[i] for i in idx]
            steps = [len(r.output) for r in reqs]  # the token about to be sampled
            with torch.inference_mode():
                sel = torch.tensor(idx, device=logits.device)
                rows_ = logits[sel].float()
                q = self.heads[name].step(reqs, rows_).to(logits.device, torch.float32)
                for j, r in enumerate(reqs):  # p_proc first: the tilt lands on its support
                    if not r.args.p.neutral:
                        rows_[j] = policy_row(rows_[j], r.prompt, r.output, r.args.p,
                                              r.temperature)
                lam = torch.tensor([r.args.lam for r in reqs], device=logits.device)
                temp = torch.tensor([r.temperature for r in reqs], device=logits.device)
                kl, bound = tilt_rows(rows_, q, lam, temp)
                logits[sel] = rows_.to(logits.dtype)
            self._record(reqs, steps, kl.tolist(), bound.tolist())
        return logits

    def close(self) -> None:
        for index in list(self.reqs):
            self._drop(index)

    # -- internals ----------------------------------------------------------------------------

    def _drop(self, index: int) -> None:
        r = self.reqs.pop(index, None)
        if r is not None:
            r.close()

    def _record(self, reqs: Sequence[_Req], steps: Sequence[int], kls: Sequence[float],
                bounds: Sequence[float]) -> None:
        if self.stats_dir is None or self.recording_failed:
            return
        try:
            for r, step, kl, bound in zip(reqs, steps, kls, bounds):
                if r.fd is None:
                    r.fd = os.open(stats_path(self.stats_dir, r.args.key),
                                   os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                record = _RECORD.pack(step, kl, bound)
                if os.write(r.fd, record) != len(record):  # a full disk may write part
                    raise OSError(errno.ENOSPC, "short write of a step record")
        except OSError as exc:
            # ENOSPC, EMFILE, EDQUOT...: an exception here would kill the engine's worker,
            # i.e. every request. The records only feed the KL accounting: stop recording
            # (answers then say their kl_estimate is missing, decoding/tokenwise_cd.py; a
            # torn last record is skipped by read_steps) and keep tilting.
            self.recording_failed = True
            log.error("CD-Q step records disabled: cannot write to %s (%s); tokenwise_cd "
                      "answers carry no kl_estimate until the engine restarts",
                      self.stats_dir, exc)


def _is_swap(direction) -> bool:
    """vLLM's MoveDirectionality.SWAP, by name (this module does not import vllm)."""
    return getattr(direction, "name", direction) == "SWAP"
