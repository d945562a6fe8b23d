"""A CD-Q head that decodes incrementally: one token per request per step, batched, no copies.

Used by the engine-side tilt (heads/processor.py): at every engine step each tilted request
has one new token (after its prompt was prefilled once), so the head's backbone runs one decode
step over the batch instead of a forward over the whole prefix (Mudgal et al. 2024,
arXiv 2310.17022: Q(x, yᵗ, ·) for all next tokens from the hidden state at the last position).

The keys and values live in a `SlotCache` (heads/slots.py): row i of every layer's buffer is
one request's cache, so a step's batch is a view of rows 0 .. n − 1 and each row's new key is
written at that row's own position. transformers' forward cannot attend over such a layout
(its caches hold one length for the whole batch), so `_forward` runs the decoder layers itself:
the same modules (norms, projections, rotary embedding, MLP), our attention over the buffer
with a per-row causal mask. That fixes the layer layout to the Llama family (Llama, Mistral,
Qwen2 without sliding windows), checked at load; the unit tests hold it equal to transformers'
own forward.

The projections run as `_Linear`s: q/k/v and gate/up fused into one product each, and on CPU
the weights reordered once into oneDNN's blocked layout (what inductor's weight freezing does,
and why vLLM's own CPU step is faster than eager transformers). Measured on one core, 30 layers'
projections at batch 8: 72 ms with aten, 42 ms packed, 20 ms packed in bfloat16 (the engine's
dtype where the CPU has it: `engine_dtype`). The decoder's own Linear modules are dropped
afterwards, so the weights are held once.

Rows of live requests that take no part in a step (not in this apply) get a placeholder token
at their next position, which their own next token overwrites; their length does not move.

A head on the policy's own backbone runs no backbone at all. The head reads the backbone's final
(normed) hidden state h, and the engine's raw logits are l = W·h with W the backbone's output
embedding ([V, H], no bias, no logit scaling or soft-capping; tied to the input embedding in
SmolLM2). W has full column rank (V = 49,152 ≫ H = 576; condition number 91 for SmolLM2-135M),
so h = W⁺·l, W⁺ its pseudo-inverse: one [V → H] product per row instead of a 30-layer decode
step and the prompt's prefill. Measured on SmolLM2 (8 rows): h within 6e-7 of transformers'
hidden state (relative) in float32, 0.3 % in bfloat16 (the head's dtype where the CPU has it;
the incremental bfloat16 head is further off). This holds only when the engine's weights are
the head's backbone: the same local checkpoint folder, unquantised, no LoRA in the head, and no
swapped-in checkpoint, adapter or logit_bias for the request (the engine then marks it
`policy_logits = false`, runtime/engine.py); a row with a masked (−∞) logit (min_tokens,
allowed_token_ids, bad words, a grammar) is not W·h either.
Such rows take the incremental path, which first catches up on the tokens it has not seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F

from .model import load_checkpoint
from .slots import SlotCache

# decoder layouts `_forward` reproduces (q/k/v/o projections, rotary, pre-norm, gated MLP)
_LAYOUTS = ("llama", "mistral", "qwen2")
_PACK_BATCH = 8  # oneDNN's batch-size hint for the reordered weights; any batch runs on them


class _Linear:
    """x·Wᵀ + b over the last axis of x, with W reordered for oneDNN on CPU (module docstring)."""

    def __init__(self, *parts: torch.nn.Linear) -> None:
        weight = torch.cat([p.weight.detach() for p in parts])
        biases = [p.bias for p in parts]
        self.bias = None if all(b is None for b in biases) else torch.cat([
            b.detach() if b is not None else weight.new_zeros(p.out_features)
            for p, b in zip(parts, biases)])
        self.sizes = [p.out_features for p in parts]
        packable = weight.device.type == "cpu" and _onednn_has(weight.dtype)
        self.weight = (torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH)
                       if packable else weight)
        self._packed = packable

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._packed:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight,
                                               self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


class _Layer:
    """One decoder layer's parts as `_forward` uses them."""

    def __init__(self, layer: torch.nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.norm_in, self.norm_mlp = layer.input_layernorm, layer.post_attention_layernorm
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.qkv = _Linear(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o = _Linear(attn.o_proj)
        self.gate_up = _Linear(mlp.gate_proj, mlp.up_proj)
        self.down = _Linear(mlp.down_proj)
        self.act = mlp.act_fn


class IncrementalQ:
    """A CD-Q checkpoint (heads/model.py) as a `processor.StepHead`."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, policy: str | None = None) -> None:
        self.config, head, lm = load_checkpoint(Path(folder).expanduser())
        if self.config.method != "cdq":
            raise ValueError(f"{folder}: a {self.config.method} head has no per-token Q values "
                             "(train it with --method cdq)")
        _check_layout(folder, lm.config)
        self.device = torch.device(device)
        # h from the engine's logits when they are the policy's W·h (module docstring); from
        # W in float32, before the backbone is cast to `dtype`
        self._unembed = _unembedding(self.config, lm, policy, self.device, dtype)
        self.decoder = lm.get_decoder().to(self.device, dtype)  # hidden states only, no LM head
        self.vocab_size = self.config.vocab_size
        self._std, self._mean = self.config.reward_std, self.config.reward_mean
        self._clip = self.config.clip_range()  # the certified range (tokenwise CD's KL bound)
        with torch.inference_mode():
            self._layers = [_Layer(layer) for layer in self.decoder.layers]
            head = head.to(self.device, dtype)
            self._q = _Linear(head.state, head.token)  # [s(h), W·h + b] in one product
        for layer in self.decoder.layers:  # their weights now live in _layers only
            layer.self_attn = layer.mlp = None
        self.kv = SlotCache(len(self._layers), lm.config.num_key_value_heads,
                            self._layers[0].head_dim,
                            dtype=torch.float32, device=self.device)  # see _forward

    @property
    def shares_policy(self) -> bool:
        """Whether it reads hidden states back from the policy's logits (module docstring)."""
        return self._unembed is not None

    @torch.inference_mode()
    def step(self, reqs: Sequence, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Q(x, yᵗ, ·) [b, V] in reward units (clipped to the checkpoint's value_range): from
        the engine's raw `logits` rows where they are the policy's W·h (module docstring),
        else after consuming each request's unseen tokens."""
        hidden = torch.empty(len(reqs), self.config.hidden_size, device=self.device,
                             dtype=self.decoder.embed_tokens.weight.dtype)
        direct: set[int] = set()
        if self._unembed is not None and logits is not None:
            finite = torch.isfinite(logits).all(-1).tolist()
            direct = {i for i, r in enumerate(reqs) if finite[i] and r.args.policy_logits}
            if direct:
                rows = sorted(direct)
                hidden[rows] = self._unembed(logits[rows].to(self.device, hidden.dtype))
        one: list[int] = []
        for i, r in enumerate(reqs):
            if i in direct:
                if r.cache is not None:  # back from the incremental path: its slot is idle now
                    r.cache.release()
                    r.cache, r.seen = None, 0
                continue
            new = r.unseen()
            if not new:  # an extra apply in the same step would tilt by a stale Q
                raise RuntimeError("CD-Q tilt: a request has no token the head has not seen")
            if r.cache is not None and len(new) == 1:
                one.append(i)
            else:  # the prompt, or a request that missed steps: its own forward
                if r.cache is None:
                    r.cache = self.kv.acquire()
                hidden[i] = self._extend(r, new)
        if one:
            hidden[one] = self._decode([reqs[i] for i in one])
        sq = self._q(hidden)  # Q = s(h) + W·h + b (model.ValueHead.q_all)
        q = (sq[:, 1:] + sq[:, :1]).float() * self._std + self._mean
        # clipped to the training targets' range, as every scorer of this head: the tilt's
        # per-step KL is then ≤ min(λR, λ²R²/8) (decoding/kl.py), the bound the API reports
        return q if self._clip is None else q.clamp_(*self._clip)

    # -- internals ----------------------------------------------------------------------------

    def _extend(self, r, new: list[int]) -> torch.Tensor:
        """Feed `new` after r's cached tokens; hidden state at the last position [H]."""
        slot = r.cache
        ids = torch.tensor([new], device=self.device)
        start = torch.tensor([slot.length], device=self.device)
        h = self._forward(slice(slot.index, slot.index + 1), ids, start)
        slot.length += len(new)
        r.seen = slot.length
        return h[0, -1]

    def _decode(self, reqs: Sequence) -> torch.Tensor:
        """One new token for each request, one forward over all live slots; hidden [b, H]."""
        slots = self.kv.slots
        ids = torch.zeros(len(slots), 1, dtype=torch.long, device=self.device)
        rows = [r.cache.index for r in reqs]
        ids[rows, 0] = torch.tensor([r.unseen()[0] for r in reqs], device=self.device)
        start = torch.tensor([s.length for s in slots], device=self.device)
        h = self._forward(slice(0, len(slots)), ids, start)
        for r in reqs:
            r.cache.length += 1
            r.seen = r.cache.length
        return h[rows, -1]

    def _forward(self, rows: slice, ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Tokens ids [n, T] at positions start + 0 .. T − 1 of the slots `rows`, written into
        their caches; final hidden states [n, T, H]."""
        n, t = ids.shape
        pos = start[:, None] + torch.arange(t, device=self.device)  # [n, T]
        width = int(pos.max()) + 1
        self.kv.reserve(width)
        # row i's query at position p attends to its own keys at positions ≤ p (an additive
        # mask, built once per step: SDPA on CPU is faster with it than with a boolean one)
        x = self.decoder.embed_tokens(ids)
        allowed = (torch.arange(width, device=self.device) <= pos[..., None])[:, None]
        mask = torch.zeros(allowed.shape, device=self.device)
        mask.masked_fill_(~allowed, -math.inf)
        cos, sin = self.decoder.rotary_emb(x, position_ids=pos)
        at = torch.arange(n, device=self.device)[:, None]
        for layer, keys, values in zip(self._layers, self.kv.keys, self.kv.values):
            q, k, v = (y.view(n, t, -1, layer.head_dim).transpose(1, 2)
                       for y in layer.qkv(layer.norm_in(x)).split(layer.qkv.sizes, -1))
            # attention in float32 whatever the weights' dtype: CPU SDPA is ~3× slower in bf16
            q, k = (y.float() for y in _rotary(q, k, cos, sin))
            past_k, past_v = keys[rows], values[rows]  # views of the live rows
            past_k[at, :, pos] = k.transpose(1, 2)  # [n, T, kv_heads, d] at each row's positions
            past_v[at, :, pos] = v.transpose(1, 2).float()
            o = F.scaled_dot_product_attention(q, past_k[:, :, :width], past_v[:, :, :width],
                                               attn_mask=mask, scale=layer.scaling,
                                               enable_gqa=True)
            x = x + layer.o(o.transpose(1, 2).reshape(n, t, -1).to(x.dtype))
            gate, up = layer.gate_up(layer.norm_mlp(x)).chunk(2, -1)
            x = x + layer.down(layer.act(gate) * up)
        return self.decoder.norm(x)


def _rotary(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def _check_layout(folder, config) -> None:
    kind = getattr(config, "model_type", None)
    window = getattr(config, "sliding_window", None)
    sliding = (window is not None and getattr(config, "use_sliding_window", True)
               and window < config.max_position_embeddings)
    if kind not in _LAYOUTS or sliding:
        raise ValueError(f"{folder}: the in-engine tilt decodes {', '.join(_LAYOUTS)} backbones "
                         f"without sliding-window attention; this head's backbone is {kind!r}"
                         + (" with a sliding window" if sliding else ""))


def _onednn_has(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs products of this dtype natively on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16
                                      and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def engine_dtype(device: torch.device) -> torch.dtype:
    """The head's dtype in the engine: bfloat16 where the hardware multiplies it natively (CUDA
    with bf16, CPUs with AVX512-BF16 or AMX), float32 elsewhere. A decode step reads every
    weight once, so half the bytes is about half the time: on one core of this machine the 30
    layers' products at batch 8 take 40 ms in float32 and 20 ms in bfloat16. The cost in
    accuracy, measured on the trained CD-Q head over 33 steps of 8 requests: Q differs from
    float32 by 0.001 on average and 0.020 at most (reward units; the Q spread over the
    vocabulary is 0.06), and the tilted distributions
    exp(λQ) by a KL of at most 7e-5 nats per step at λ = 1 and 4. The KL the server reports is
    computed from the logits actually sampled from, so it stays exact."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and _onednn_has(torch.bfloat16) else torch.float32


def _unembedding(config, lm, policy: str | None, device: torch.device,
                 dtype: torch.dtype) -> _Linear | None:
    """W⁺ as a [V → H] product when the engine's logits are this head's backbone's W·h (module
    docstring), else None."""
    out = lm.get_output_embeddings()
    scaled = any(getattr(lm.config, k, None) not in (None, 1.0)
                 for k in ("logit_scale", "final_logit_softcapping", "logits_scaling"))
    if (policy is None or not Path(policy).expanduser().is_dir() or config.lora or out is None
            or out.bias is not None or scaled or _resolved(policy) != _resolved(config.backbone)):
        return None
    with torch.inference_mode():
        pinv = torch.linalg.pinv(out.weight.detach().double()).to(dtype)  # [H, V]
        lin = torch.nn.Linear(pinv.shape[1], pinv.shape[0], bias=False, device=device,
                              dtype=dtype)
        lin.weight.copy_(pinv)
        return _Linear(lin)


def _resolved(path: str) -> Path:
    return Path(path).expanduser().resolve()


def load_engine_heads(heads: dict[str, str], vocab_size: int, device,
                      policy: str | None = None) -> dict[str, IncrementalQ]:
    """Every named head, checked against the policy's vocabulary (a one-line error names it).
    `policy`: the engine's model folder; a head trained on that very backbone reads hidden
    states back from the engine's logits (module docstring)."""
    out = {}
    dtype = engine_dtype(torch.device(device))
    for name, folder in heads.items():
        head = IncrementalQ(folder, device, dtype, policy)
        if head.vocab_size != vocab_size:
            raise ValueError(f"value head {name!r} ({folder}) has a vocabulary of "
                             f"{head.vocab_size} tokens, the policy {vocab_size}: it cannot tilt "
                             "this policy")
        out[name] = head
    return out


def check_tokenizer(name: str, backbone: str, policy: str) -> None:
    """Refuse a head whose backbone tokenizes differently from the policy (same vocabulary and
    the same id for every token string): it would read the policy's ids as other tokens."""
    if _resolved(backbone) == _resolved(policy):
        return
    from transformers import AutoTokenizer

    head_vocab = AutoTokenizer.from_pretrained(backbone).get_vocab()
    policy_vocab = AutoTokenizer.from_pretrained(policy).get_vocab()
    if head_vocab != policy_vocab:
        diff = len(head_vocab.items() ^ policy_vocab.items())
        raise ValueError(f"value head {name!r}: its tokenizer ({backbone}, {len(head_vocab)} "
                         f"tokens) differs from the policy's ({policy}, {len(policy_vocab)} "
                         f"tokens; {diff} entries differ): train it on the policy's tokenizer")
