"""Preallocated key/value buffers for the engine-side head: one slot (row) per live request.

The in-engine tilt (heads/incremental.py) decodes one token per step for every tilted request.
With a per-request cache, every step had to gather the requests' caches into one batch tensor
(and split the result back), i.e. copy every cached token of every request at every step:
O(batch · length) bytes per step, as much again as reading the backbone's weights. Here the
cache *is* the batch: per layer one buffer [slots, kv_heads, capacity, head_dim] whose row i is
one request's keys (or values) at positions 0 .. length − 1. A decode step reads rows 0 .. n − 1
as a view and writes each row's new key at its own position; nothing else moves.

Rows stay contiguous: a released slot is filled with the last one (one copy of that row when a
request leaves, not one per step). Buffers grow by doubling (slots or capacity, one copy each
time) and shrink back when the last request leaves, so one long burst does not hold its memory.
All buffer work runs in inference mode: the buffers are written inside the head's
inference-mode forward, and a request leaves (release) from vLLM's update_state, outside it.
Per token: 2 · layers · kv_heads · head_dim floats (46 KB for SmolLM2-135M in float32).
"""

from __future__ import annotations

import torch


class Slot:
    """One request's row: `index` moves when other slots are released; `length` tokens held."""

    def __init__(self, owner: SlotCache, index: int) -> None:
        self._owner, self.index, self.length = owner, index, 0

    def release(self) -> None:
        self._owner.release(self)


class SlotCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, slots: int = 4, capacity: int = 256) -> None:
        self._shape = (layers, kv_heads, head_dim)
        self._dtype, self._device = dtype, device
        self._initial = (slots, capacity)
        self.slots: list[Slot] = []  # live slots; slots[i].index == i
        self._alloc(slots, capacity)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @torch.inference_mode()  # the buffers are inference tensors, written by the head's forward
    def acquire(self) -> Slot:
        n = len(self.slots)
        if n == self.keys[0].shape[0]:
            self._alloc(2 * n, self.capacity)
        slot = Slot(self, n)
        self.slots.append(slot)
        return slot

    @torch.inference_mode()
    def release(self, slot: Slot) -> None:
        if slot.index < 0:
            return  # released already
        last = self.slots.pop()
        if last is not slot:  # move the last row into the hole: rows stay 0 .. n − 1
            i, j, n = slot.index, last.index, last.length
            for buf in (*self.keys, *self.values):
                buf[i, :, :n] = buf[j, :, :n]
            last.index = i
            self.slots[i] = last
        slot.index = -1
        if not self.slots:
            self._alloc(*self._initial)  # give a burst's memory back

    @torch.inference_mode()
    def reserve(self, length: int) -> None:
        """Room for `length` positions in every row."""
        if length > self.capacity:
            self._alloc(self.keys[0].shape[0], max(2 * self.capacity, -(-length // 64) * 64))

    @torch.inference_mode()
    def _alloc(self, slots: int, capacity: int) -> None:
        layers, heads, dim = self._shape
        old = getattr(self, "keys", None), getattr(self, "values", None)
        self.keys = [torch.zeros(slots, heads, capacity, dim, dtype=self._dtype,
                                 device=self._device) for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        if old[0] is not None and self.slots:  # keep what the live slots hold
            n = len(self.slots)
            width = max(s.length for s in self.slots)
            for new, prev in zip((*self.keys, *self.values), (*old[0], *old[1])):
                new[:n, :, :width] = prev[:n, :, :width]
