"""The answer a controlled decoder builds piece by piece (blocks or single tokens).

Shared by `blockwise_cd` and `tokenwise_cd` (Mudgal et al. 2024, arXiv 2310.17022): the
accepted token ids and their policy log-probs, the text (always the engine's decoding of the
*whole* id list: a piece decoded on its own can split a multi-byte character, e.g. an emoji
spread over two byte-level tokens), stop strings that may span two pieces, and streaming of
the text committed so far through `DecodeRequest.emit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .protocols import Engine
from .request import DecodeRequest
from .types import Sample, Sampling

_REPLACEMENT = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence


def capped(sampling: Sampling, **changes) -> Sampling:
    return dataclasses.replace(sampling, **changes)


class Committed:
    """Accepted ids, text and finish state of one answer."""

    def __init__(self, req: DecodeRequest, engine: Engine) -> None:
        self.req, self.engine = req, engine
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.emitted = ""  # the prefix of `text` already passed to `emit`

    @property
    def budget_left(self) -> int:
        return self.req.sampling.max_tokens - len(self.ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def preview(self, more: Sequence[int]) -> str:
        """The text the answer would have with `more` appended (what text scorers judge)."""
        return self.engine.decode(self.ids + list(more))

    def append(self, ids: Sequence[int], logprobs: Sequence[float], finish: str | None) -> int:
        """Accept a piece; return how many of its ids were kept. `finish` is the engine's
        reason for the piece ("stop": EOS or a stop string inside the piece); EOS ids, a stop
        string across pieces and the token budget end the answer too.

        A stop string that begins in an earlier piece and ends in this one cuts the text, and
        the ids (and log-probs) after the token that completes it are dropped, as the engine
        itself does within one piece: `usage` and ε then count exactly what was returned."""
        before = len(self.ids)
        self.ids += ids
        self.logprobs += logprobs
        text = self.engine.decode(self.ids)
        cut = _first_stop(text, self.req.sampling.stop)
        if cut is not None:
            keep = self._stop_token(before)
            del self.ids[keep:], self.logprobs[keep:]
            text, finish = self.engine.decode(self.ids), "stop"
            text = text[:_first_stop(text, self.req.sampling.stop)]
        elif any(t in self.engine.eos_token_ids for t in ids):
            finish = "stop"
        elif finish != "stop":
            finish = "length" if self.budget_left <= 0 else None
        self.text, self.finish_reason = text, finish
        self._emit()
        return len(self.ids) - before

    def _stop_token(self, start: int) -> int:
        """The length of the shortest id prefix (longer than `start`) whose text holds a stop
        string: the ids up to the token that completes it."""
        stops = self.req.sampling.stop
        for end in range(start + 1, len(self.ids) + 1):
            if _first_stop(self.engine.decode(self.ids[:end]), stops) is not None:
                return end
        return len(self.ids)

    def _emit(self) -> None:
        if self.req.emit is None:
            return
        if self.done:
            stable = self.text
        else:
            stable = self.text.rstrip(_REPLACEMENT)  # an unfinished character: wait for its bytes
            # A stop string may begin in the text committed now and end in the next piece:
            # hold back a tail that could start one, so nothing streamed is ever retracted.
            stable = stable[: len(stable) - _stop_prefix_len(stable, self.req.sampling.stop)]
        if len(stable) > len(self.emitted) and stable.startswith(self.emitted):
            self.req.emit(stable[len(self.emitted):])
            self.emitted = stable

    def sample(self) -> Sample:
        return Sample(list(self.ids), self.text, list(self.logprobs), self.finish_reason)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:n])), default=0)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
