"""OpenAI-shaped `logprobs` of an answer (chat: `content[]`; completions: parallel lists).

The values are the engine's *processed* log-probabilities (after temperature, top-p/top-k,
penalties and logit_bias: the distribution each token was actually drawn from), so for the
returned answer they sum to `alignment.candidates[i].logprob` — the log ε of the KL estimate.
Token strings are each id decoded on its own, as vLLM reports them.
"""

from __future__ import annotations

from collections.abc import Sequence

from .protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


class TokenText:
    """Decodes single token ids (memoised: answers repeat tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, tok: int) -> str:
        text = self._cache.get(tok)
        if text is None:
            text = self._cache[tok] = self.tokenizer.decode([tok])
        return text


def chat_logprobs(text: TokenText, ids: Sequence[int], logprobs: Sequence[float],
                  top: Sequence[dict[int, float]] | None, k: int) -> ChatLogprobs:
    content = []
    for i, (tok, lp) in enumerate(zip(ids, logprobs)):
        alts = sorted((top[i] if top and i < len(top) else {}).items(), key=lambda kv: -kv[1])
        content.append(TokenLogprob(
            token=text(tok), logprob=lp, bytes=list(text(tok).encode()),
            top_logprobs=[TopLogprob(token=text(t), logprob=v, bytes=list(text(t).encode()))
                          for t, v in alts[:k]]))
    return ChatLogprobs(content=content)


def completion_logprobs(text: TokenText, ids: Sequence[int], logprobs: Sequence[float],
                        top: Sequence[dict[int, float]] | None, k: int,
                        offset: int = 0) -> CompletionLogprobs:
    tokens, offsets, tops = [], [], []
    for i, tok in enumerate(ids):
        piece = text(tok)
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        if k:
            alts = sorted((top[i] if top and i < len(top) else {}).items(), key=lambda kv: -kv[1])
            tops.append({text(t): v for t, v in alts[:k]})
    return CompletionLogprobs(text_offset=offsets, token_logprobs=list(logprobs[:len(ids)]),
                              tokens=tokens, top_logprobs=tops if k else None)
