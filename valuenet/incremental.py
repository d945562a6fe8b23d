"""A CD-Q head that decodes incrementally: per-request KV caches, one token per step, batched.

Used by the engine-side tilt (valuenet/processor.py): at every engine step each tilted request
has one new token (after its prompt was prefilled once), so the head's backbone runs one
decode step over the batch instead of a forward over the whole prefix (Mudgal et al. 2024,
arXiv 2310.17022: Q(x, yᵗ, ·) for all next tokens from the hidden state at the last position).

Batching requests whose caches have different lengths: the caches are left-padded to the
longest, with an attention mask over past + new positions and explicit position ids (each
request's own length), so every real token keeps its position and padding is never attended.
Requests with new tokens other than exactly one (the first step: the prompt; a re-added
request) are prefilled or extended one by one.

Shapes: a request's cache is a transformers DynamicCache whose layers hold keys and values
[1, kv_heads, length, head_dim]. A request decoded alone keeps its cache object (one append per
layer per step); a batch is assembled from the layers' tensors and split back into new caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .model import load_checkpoint


class IncrementalQ:
    """A CD-Q checkpoint (valuenet/model.py) as a `processor.StepHead`."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        self.config, head, lm = load_checkpoint(Path(folder).expanduser())
        if self.config.method != "cdq":
            raise ValueError(f"{folder}: a {self.config.method} head has no per-token Q values "
                             "(train it with --method cdq)")
        self.device = torch.device(device)
        self.head = head.to(self.device)
        self.decoder = lm.get_decoder().to(self.device)  # hidden states only, no LM head
        self.vocab_size = self.config.vocab_size
        self._std, self._mean = self.config.reward_std, self.config.reward_mean

    @torch.inference_mode()
    def step(self, reqs: Sequence) -> torch.Tensor:
        """Q(x, yᵗ, ·) [b, V] in reward units, after consuming each request's unseen tokens."""
        hidden = torch.empty(len(reqs), self.config.hidden_size, device=self.device)
        one: list[int] = []
        for i, r in enumerate(reqs):
            new = r.unseen()
            if r.cache is not None and len(new) == 1 and len(reqs) > 1:
                one.append(i)
            elif not new:  # nothing new (an extra apply in the same step): recompute last
                raise RuntimeError("CD-Q tilt: a request has no token the head has not seen")
            else:
                hidden[i] = self._extend(r, new)
        if one:
            hidden[one] = self._decode([reqs[i] for i in one])
        return self.head.q_all(hidden) * self._std + self._mean

    # -- internals ----------------------------------------------------------------------------

    def _extend(self, r, new: list[int]) -> torch.Tensor:
        """Feed `new` after r's cache (or from scratch); hidden state at the last position [H]."""
        from transformers import DynamicCache

        past = r.cache if r.cache is not None else DynamicCache()
        ids = torch.tensor([new], device=self.device)
        pos = torch.arange(r.seen, r.seen + len(new), device=self.device)[None]
        out = self.decoder(input_ids=ids, position_ids=pos, past_key_values=past, use_cache=True)
        r.cache = out.past_key_values  # the same object, appended to in place
        r.seen += len(new)
        return out.last_hidden_state[0, -1]

    def _decode(self, reqs: Sequence) -> torch.Tensor:
        """One new token for each request, in one batched forward; hidden states [b, H]."""
        from transformers import DynamicCache

        caches = [[(layer.keys, layer.values) for layer in r.cache.layers] for r in reqs]
        lengths = [r.seen for r in reqs]
        width = max(lengths)
        b = len(reqs)
        ids = torch.tensor([r.unseen() for r in reqs], device=self.device)  # [b, 1]
        pos = torch.tensor(lengths, device=self.device)[:, None]  # [b, 1]
        if len(set(lengths)) == 1:  # the common case (n choices of one prompt): no padding
            mask = None
            layers = [tuple(torch.cat([c[li][j] for c in caches]) for j in (0, 1))
                      for li in range(len(caches[0]))]
        else:
            mask = torch.zeros(b, width + 1, dtype=torch.long, device=self.device)
            layers = []
            for li in range(len(caches[0])):
                k0 = caches[0][li][0]
                shape = (b, k0.shape[1], width, k0.shape[3])
                k, v = k0.new_zeros(shape), k0.new_zeros(shape)
                for i, (r, c) in enumerate(zip(reqs, caches)):
                    k[i, :, width - r.seen:] = c[li][0][0]
                    v[i, :, width - r.seen:] = c[li][1][0]
                layers.append((k, v))
            for i, r in enumerate(reqs):
                mask[i, width - r.seen:] = 1
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos,
                           past_key_values=DynamicCache(ddp_cache_data=layers), use_cache=True)
        new_layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        for i, r in enumerate(reqs):
            start = width - r.seen  # drop this request's left padding again
            r.cache = DynamicCache(ddp_cache_data=[(k[i:i + 1, :, start:], v[i:i + 1, :, start:])
                                                   for k, v in new_layers])
            r.seen += 1
        return out.last_hidden_state[:, -1]


def load_engine_heads(heads: dict[str, str], vocab_size: int, device) -> dict[str, IncrementalQ]:
    """Every named head, checked against the policy's vocabulary (a one-line error names it)."""
    out = {}
    for name, folder in heads.items():
        head = IncrementalQ(folder, device)
        if head.vocab_size != vocab_size:
            raise ValueError(f"value head {name!r} ({folder}) has a vocabulary of "
                             f"{head.vocab_size} tokens, the policy {vocab_size}: it cannot tilt "
                             "this policy")
        out[name] = head
    return out


def check_tokenizer(name: str, backbone: str, policy: str) -> None:
    """Refuse a head whose backbone tokenizes differently from the policy (same vocabulary and
    the same id for every token string): it would read the policy's ids as other tokens."""
    if Path(backbone).expanduser().resolve() == Path(policy).expanduser().resolve():
        return
    from transformers import AutoTokenizer

    head_vocab = AutoTokenizer.from_pretrained(backbone).get_vocab()
    policy_vocab = AutoTokenizer.from_pretrained(policy).get_vocab()
    if head_vocab != policy_vocab:
        diff = len(head_vocab.items() ^ policy_vocab.items())
        raise ValueError(f"value head {name!r}: its tokenizer ({backbone}, {len(head_vocab)} "
                         f"tokens) differs from the policy's ({policy}, {len(policy_vocab)} "
                         f"tokens; {diff} entries differ): train it on the policy's tokenizer")
