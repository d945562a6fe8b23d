"""Trained value heads as scorers (`value:NAME` in the server's registry).

- `ValueHeadScorer` (CD-FUDGE heads; FUDGE: Yang & Klein 2021) implements
  `decoding.protocols.TokenScorer`: `score_ids(prompt_ids, responses)` is V(x, y) at the last
  token of each response (the prompt's last token for an empty response).
- `QValueHeadScorer` (CD-Q heads; Mudgal et al. 2024, arXiv 2310.17022) adds
  `decoding.protocols.QScorer.q_values`: V(x, yᵗ, z) for candidate next tokens z, all from one
  forward pass over x + yᵗ. FUDGE heads have no `q_values` attribute at all, so
  `hasattr(scorer, "q_values")` tells a tokenwise decoder whether a head can drive it.

Values are in reward units: the checkpoint's reward normalisation is undone. Everything runs in
float32 on CPU; responses are scored in right-padded batches; a lock serialises the model, so one
scorer can be shared by a thread pool. The backbone keeps its own KV cache across calls
(heads/kvcache.py): a blockwise CD block costs the M new tokens of each candidate, a tokenwise
CD step one token, instead of the whole prompt + prefix again. `score_ids_pairs` scores pairs of
different prompts in one batch (the server's cross-request batching). A head is its own model,
separate from the policy, so it keeps working after the policy is hot-swapped (it still values
the policy it was trained on).

A head's values are those of the rollouts' sampling distribution p_T (temperature T, top_p),
recorded in the checkpoint and exposed as `trained_temperature` / `trained_top_p`: the tilt
p·exp(λ·V) targets π* (Mudgal et al. 2024) only when the request samples from that same
p_T. `warnings_for(temperature, top_p, **controls)` returns a human-readable warning for every
mismatch (the server reports them as `alignment.warnings`); it is pure, so it can be called per
request. Besides temperature and top_p, every other control that changes p — top_k, min_p, the
presence / frequency / repetition penalties, logit_bias, min_tokens (it masks EOS), structured
output — is checked against the neutral value the rollouts were drawn with (both rollout
producers, valuenet/rollouts.py and valuenet/http_rollouts.py, sample with them off).

Values are clipped to the checkpoint's `value_range` (the training targets' range, when it
records one) and that range is exposed as `value_range`: tokenwise CD's KL bound
(decoding/tokenwise_cd.py) needs a certified range of Q, and the clip is what certifies it.
Clipping changes nothing a well-fitted head predicts (E[r | prefix] lies within the rewards'
range) and stops an extrapolating one from tilting without limit.

`score(prompt, responses)` on text is an approximate fallback: the prompt is chat-templated as one
user message with the backbone's tokenizer and responses are re-tokenised, which need not give the
ids the policy sampled (prefer `score_ids`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from .kvcache import CachedBackbone, States
from .model import (
    hidden_states,
    load_causal_lm,
    load_checkpoint,
    pad_batch,
    policy_probs,
)

# Temperatures / top_p closer than this are the same setting (JSON round trips: 0.7 vs
# 0.7000001).
SAMPLING_TOL = 1e-6

# The controls other than temperature / top_p that change the sampled distribution p, with the
# neutral value every rollout was drawn at (a value head's values are those of that p).
NEUTRAL_CONTROLS: dict[str, object] = {
    "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "repetition_penalty": 1.0, "logit_bias": (), "min_tokens": 0, "structured": None,
}

# Backbone KV kept across calls, in tokens (46 KB each for SmolLM2-135M in float32: ~380 MB).
DEFAULT_CACHE_TOKENS = 8192


class ValueHeadScorer:
    """A CD-FUDGE (or, via the subclass, CD-Q) value head loaded from a checkpoint folder."""

    def __init__(self, folder: str | Path, name: str | None = None, batch_size: int = 16,
                 cache_tokens: int = DEFAULT_CACHE_TOKENS) -> None:
        self.folder = Path(folder).expanduser()
        self.config, self._head, self._lm = load_checkpoint(self.folder)
        self.name = name or f"value:{self.folder.name}"
        self.method = self.config.method
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self._tokenizer = None
        self._ref_lm = None  # CD-Q, empty responses, reference ≠ backbone: loaded on first use
        self.trained_temperature, self.trained_top_p = self.config.sampling()
        self.value_range = self.config.clip_range()  # None: no certified range
        self.vocab_size = self.config.vocab_size
        # 0: no cache, every call runs the backbone over the whole prompt + response
        self._backbone = CachedBackbone(self._lm, cache_tokens) if cache_tokens > 0 else None

    # -- public API -------------------------------------------------------------------------

    def warnings_for(self, temperature: float, top_p: float = 1.0, **controls) -> list[str]:
        """Warnings (possibly none) for using this head on a request that samples at
        `temperature` / `top_p` (the effective values: pass 1.0 for an unset field) with the
        other sampling `controls` (`Sampling` field names; unknown ones are ignored, omitted ones
        are neutral): every control that changes p away from the rollouts' p gets one."""
        if self.trained_temperature is None:
            out = [f"{self.name}: its checkpoint does not record the sampling temperature of "
                   "its rollouts, so whether its values fit this request is unknown"]
        else:
            out = [self._mismatch(field, f"{want:g}", f"{got:g}")
                   for field, want, got in (("temperature", self.trained_temperature, temperature),
                                            ("top_p", self.trained_top_p, top_p))
                   if not math.isclose(want, got, rel_tol=SAMPLING_TOL, abs_tol=SAMPLING_TOL)]
        for field, neutral in NEUTRAL_CONTROLS.items():
            got = controls.get(field, neutral)
            if _changes_p(got, neutral):
                out.append(self._mismatch(field, _show(neutral), _show(got)))
        return out

    def _mismatch(self, field: str, want: str, got: str) -> str:
        return (f"{self.name} was trained on rollouts sampled at {field} {want}, this request "
                f"samples at {field} {got}: its values are those of the other sampling "
                "distribution, so the tilt does not target π*")

    def score_ids(self, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]]) -> list[float]:
        """V(x, y) for each response, in reward units."""
        prompt = self._check_prompt(prompt_ids)
        return self.score_ids_pairs([(prompt, r) for r in responses])

    def score_ids_pairs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[float]:
        """V(x, y) for (prompt_ids, response_ids) pairs of any prompts (a TokenPairScorer: the
        server batches value calls of different requests through it)."""
        items = [(self._check_prompt(p), list(r)) for p, r in pairs]
        out: list[float] = []
        for i in range(0, len(items), self._batch_size):
            chunk = items[i : i + self._batch_size]
            with self._lock, torch.inference_mode():
                states = self._states([p + r for p, r in chunk])
                out.extend(self._values(chunk, states))
        return [self._unnormalise(v) for v in out]

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        """Approximate text fallback (see the module docstring)."""
        tok = self._tok()
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # BatchEncoding in recent transformers
            ids = ids["input_ids"]
        resp = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
        return self.score_ids(list(ids), resp)

    @property
    def backbone_tokens(self) -> int | None:
        """Tokens the backbone has run on through the cache (None without one)."""
        return self._backbone.tokens_in if self._backbone is not None else None

    # -- internals --------------------------------------------------------------------------

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        if not prompt_ids:
            raise ValueError(f"{self.name}: a value head needs a non-empty prompt")
        return list(prompt_ids)

    def _unnormalise(self, v: float) -> float:
        """A normalised head output in reward units, clipped to the certified range."""
        out = float(v) * self.config.reward_std + self.config.reward_mean
        if self.value_range is not None:
            out = min(max(out, self.value_range[0]), self.value_range[1])
        return out

    def _states(self, seqs: list[list[int]]) -> States:
        """Final hidden states of each sequence (through the KV cache when there is one)."""
        if self._backbone is not None:
            return self._backbone.states(seqs)
        ids, mask = pad_batch(seqs)
        h = hidden_states(self._lm, ids, mask)  # [B, T, H]
        return States([0] * len(seqs), [h[i, : len(s)] for i, s in enumerate(seqs)],
                      [None] * len(seqs))

    def _values(self, items: list[tuple[list[int], list[int]]], states: States) -> list[float]:
        # V(x, yᵗ) is read at the last token of prompt + response.
        h = torch.stack([states.at(i, len(p) + len(r) - 1) for i, (p, r) in enumerate(items)])
        return self._head.value(h).tolist()

    def _tok(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.config.backbone)
        return self._tokenizer


class QValueHeadScorer(ValueHeadScorer):
    """A CD-Q head: also a `QScorer`. V(x, yᵗ) for t ≥ 1 is Q(x, yᵗ⁻¹, y_t); for the bare
    prompt it is Σ_z π_ref(z|x) Q(x, z) over the full vocabulary."""

    def q_values(
        self, prompt_ids: Sequence[int], response_ids: Sequence[int], candidates: Sequence[int]
    ) -> list[float]:
        """V(x, yᵗ, z) for each candidate z, in reward units, from one forward pass."""
        prompt = self._check_prompt(prompt_ids)
        if not candidates:
            return []
        vocab = self.config.vocab_size
        if any(not 0 <= int(z) < vocab for z in candidates):
            raise ValueError(f"{self.name}: candidate token ids must be in [0, {vocab})")
        seq = prompt + list(response_ids)
        with self._lock, torch.inference_mode():
            h = self._states([seq]).at(0, len(seq) - 1)  # [H]; x + yᵗ⁻¹ is usually cached
            q = self._head.q(h, torch.tensor([int(z) for z in candidates]))
        return [self._unnormalise(v) for v in q.tolist()]

    def _values(self, items: list[tuple[list[int], list[int]]], states: States) -> list[float]:
        out = []
        for i, (prompt, r) in enumerate(items):
            if r:
                pos = len(prompt) + len(r) - 2  # the state before the last token
                out.append(float(self._head.q(states.at(i, pos), torch.tensor([r[-1]]))[0]))
            else:
                out.append(self._prompt_value(prompt, states.at(i, len(prompt) - 1)))
        return out

    def _prompt_value(self, prompt: list[int], h_last: torch.Tensor) -> float:
        if self.config.reference_is_backbone:
            logits = self._lm.get_output_embeddings()(h_last)
        else:
            if self._ref_lm is None:
                self._ref_lm = load_causal_lm(self.config.reference)
            ids = torch.tensor([prompt])
            logits = self._ref_lm(input_ids=ids, logits_to_keep=1).logits[0, -1]
        t = 1.0 if self.trained_temperature is None else self.trained_temperature  # T = 0: greedy
        probs = policy_probs(logits, t)
        q = self._head.q_all(h_last)
        if self.value_range is not None:  # E_p[clipped Q], in normalised units
            std, mean = self.config.reward_std, self.config.reward_mean
            q = q.clamp((self.value_range[0] - mean) / std, (self.value_range[1] - mean) / std)
        return float((probs * q).sum())


def _changes_p(got, neutral) -> bool:
    if isinstance(neutral, float):
        return not math.isclose(float(got), neutral, rel_tol=SAMPLING_TOL, abs_tol=SAMPLING_TOL)
    if neutral == ():
        return bool(got)
    return got != neutral


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):  # logit_bias pairs
        return "{" + ", ".join(f"{t}: {b:g}" for t, b in value) + "}"
    if value is None or value == ():
        return "none"
    return str(value[0] if isinstance(value, tuple) else value)


def load_value_head(folder: str | Path, name: str | None = None) -> ValueHeadScorer:
    """The right scorer class for a checkpoint: QValueHeadScorer for CD-Q, else ValueHeadScorer."""
    from .model import read_config

    method = read_config(Path(folder).expanduser()).method
    cls = QValueHeadScorer if method == "cdq" else ValueHeadScorer
    return cls(folder, name=name)
