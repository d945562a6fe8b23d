"""The value head's own KV cache: a causal backbone pays only for tokens it has not seen.

Blockwise CD scores K candidates prefix + blockᵢ per block, and the next block's prefix is one
of them; tokenwise CD asks for x + yᵗ after x + yᵗ⁻¹. Without a cache every call runs the
backbone over the whole prompt + prefix again. `PrefixKVCache` keeps, per scored sequence,
the backbone's keys/values of the tokens that sequence added to the cached prefix it extended
(a tree: an entry points at its parent, so K candidates share one copy of their prefix), plus
the last hidden state. `CachedBackbone.states(seqs)` then

1. finds, for each sequence, the longest cached prefix (never the whole sequence: its last
   token is always recomputed, so its hidden state is fresh);
2. computes once a prefix that several sequences of the batch share beyond what is cached
   (the prompt of K first-block candidates; in a batch of several requests, the chat
   template's system prompt, then each request's prompt);
3. runs the backbone over the new tokens only, on top of the cached keys/values: past rows are
   right-padded to a common length and masked, position ids continue each row's own prefix;
4. stores each sequence's new keys/values.

LRU over entries, bounded by the number of tokens they hold. Per-token size: 2 · layers ·
kv_heads · head_dim floats (46 KB for SmolLM2-135M in float32). Not thread-safe: the scorer's
lock serialises it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

_SHARED_PASSES = 4


@dataclass
class _Entry:
    parent: _Entry | None
    length: int  # tokens covered, the parent's included
    keys: list[torch.Tensor]  # per layer [kv_heads, own tokens, head_dim]
    values: list[torch.Tensor]
    h_last: torch.Tensor  # [H] final hidden state at position length − 1

    @property
    def own(self) -> int:
        return self.keys[0].shape[1]

    def materialise(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values of all `length` tokens, per layer [kv_heads, length, head_dim]."""
        chain, e = [], self
        while e is not None:
            chain.append(e)
            e = e.parent
        chain.reverse()
        layers = range(len(self.keys))
        return ([torch.cat([c.keys[l] for c in chain], 1) for l in layers],
                [torch.cat([c.values[l] for c in chain], 1) for l in layers])


class PrefixKVCache:
    """Token ids → `_Entry`, least recently used evicted past `max_tokens` own tokens."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._lengths: dict[int, int] = {}  # key length → number of keys of that length
        self.tokens = 0

    def longest_prefix(self, seq: list[int], limit: int) -> _Entry | None:
        """The entry of the longest cached proper prefix of `seq`, at most `limit` tokens."""
        for n in sorted((n for n in self._lengths if n <= limit), reverse=True):
            entry = self._entries.get(tuple(seq[:n]))
            if entry is not None:
                self._entries.move_to_end(tuple(seq[:n]))
                return entry
        return None

    def put(self, seq: list[int], entry: _Entry) -> None:
        key = tuple(seq)
        if key in self._entries or entry.own > self.max_tokens:
            return
        self._entries[key] = entry
        self._lengths[len(key)] = self._lengths.get(len(key), 0) + 1
        self.tokens += entry.own
        while self.tokens > self.max_tokens:
            old, gone = self._entries.popitem(last=False)
            self.tokens -= gone.own
            self._lengths[len(old)] -= 1
            if not self._lengths[len(old)]:
                del self._lengths[len(old)]

    def clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
        self.tokens = 0


class States:
    """Final hidden states of a batch of sequences, at the positions a value head reads:
    position p of sequence i for p ≥ (cached prefix length − 1)."""

    def __init__(self, offsets: list[int], hidden: list[torch.Tensor],
                 before: list[torch.Tensor | None]) -> None:
        self._offsets, self._hidden, self._before = offsets, hidden, before

    def at(self, i: int, pos: int) -> torch.Tensor:
        off = self._offsets[i]
        if pos >= off:
            return self._hidden[i][pos - off]
        if pos == off - 1 and self._before[i] is not None:
            return self._before[i]
        raise IndexError(f"position {pos} of sequence {i} is inside its cached prefix")


class CachedBackbone:
    """A causal LM's decoder run through a `PrefixKVCache` (see the module docstring)."""

    def __init__(self, lm: nn.Module, max_tokens: int) -> None:
        self._decoder = lm.get_decoder()
        self.cache = PrefixKVCache(max_tokens)
        self.tokens_in = 0  # tokens the backbone actually ran on (padding excluded)

    def states(self, seqs: list[list[int]]) -> States:
        hits = [self.cache.longest_prefix(s, len(s) - 1) for s in seqs]
        # Shared prefixes first, coarsest to finest (a batch of several requests: the chat
        # template's system prompt, then each user prompt), a few passes at most.
        for _ in range(_SHARED_PASSES):
            shared = self._shared_prefixes(seqs, hits)
            if not shared:
                break
            self._forward([s for s, _ in shared], [h for _, h in shared])
            hits = [self.cache.longest_prefix(s, len(s) - 1) for s in seqs]
        return self._forward(seqs, hits)

    def _shared_prefixes(self, seqs, hits) -> list[tuple[list[int], _Entry | None]]:
        """For each group of ≥ 2 sequences extending the same cached entry with the same next
        token: their longest common prefix, when it goes beyond that entry (and stops before
        every sequence ends)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, h in enumerate(hits):
            start = h.length if h is not None else 0
            groups.setdefault((id(h), seqs[i][start]), []).append(i)
        out = []
        for members in groups.values():
            if len(members) < 2:
                continue
            group = [seqs[i] for i in members]
            n, limit = 0, min(len(s) for s in group) - 1
            while n < limit and all(s[n] == group[0][n] for s in group):
                n += 1
            start = hits[members[0]].length if hits[members[0]] is not None else 0
            if n > start:
                out.append((group[0][:n], hits[members[0]]))
        return out

    def _forward(self, seqs: list[list[int]], hits: list[_Entry | None]) -> States:
        from transformers import DynamicCache

        past = [h.length if h is not None else 0 for h in hits]
        new = [s[p:] for s, p in zip(seqs, past)]
        b, p_max, n_max = len(seqs), max(past), max(map(len, new))
        ids = torch.zeros((b, n_max), dtype=torch.long)
        mask = torch.zeros((b, p_max + n_max), dtype=torch.long)
        for i, (p, toks) in enumerate(zip(past, new)):
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, :p] = 1
            mask[i, p_max : p_max + len(toks)] = 1
        # Each row continues its own prefix; the padding in between is masked out.
        positions = torch.tensor(past)[:, None] + torch.arange(n_max)[None, :]
        kwargs = {}
        if p_max:
            kwargs["past_key_values"] = DynamicCache(ddp_cache_data=self._past(hits, p_max))
        out = self._decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, **kwargs)
        h = out.last_hidden_state  # [B, n_max, H]
        layers = out.past_key_values.layers  # keys/values [B, kv_heads, p_max + n_max, d]
        self.tokens_in += sum(map(len, new))
        for i, (seq, toks) in enumerate(zip(seqs, new)):
            own = slice(p_max, p_max + len(toks))
            self.cache.put(seq, _Entry(
                hits[i], len(seq), [l.keys[i, :, own].clone() for l in layers],
                [l.values[i, :, own].clone() for l in layers], h[i, len(toks) - 1].clone()))
        return States(past, [h[i, : len(t)] for i, t in enumerate(new)],
                      [e.h_last if e is not None else None for e in hits])

    @staticmethod
    def _past(hits: list[_Entry | None], p_max: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [B, kv_heads, p_max, d], each row right-padded with zeros."""
        ref = next(h for h in hits if h is not None)
        rows = [h.materialise() if h is not None else None for h in hits]
        out = []
        for l, k_ref in enumerate(ref.keys):
            heads, d = k_ref.shape[0], k_ref.shape[2]
            k = torch.zeros((len(hits), heads, p_max, d), dtype=k_ref.dtype)
            v = torch.zeros_like(k)
            for i, row in enumerate(rows):
                if row is not None:
                    k[i, :, : row[0][l].shape[1]] = row[0][l]
                    v[i, :, : row[1][l].shape[1]] = row[1][l]
            out.append((k, v))
        return out
