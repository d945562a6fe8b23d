"""Rollouts: K samples per prompt from the reference policy, scored, on disk (the library of
`alignserve rollouts`, whose flags and entry point are valuenet/rollouts_cli.py).

Data flow: prompts file → chat-templated token prompts (exactly the server's chat path:
template with tokenize=False, then encode without extra special tokens, so `prompt_ids` equal
what the server feeds the engine) → one engine request with n=K per prompt, `--concurrency`
prompts in flight so that vLLM batches them → reward (and cost) scorers from the server's
registry, in worker threads → `valuenet.data.append_rollouts` as each prompt finishes.

These are the reference samples CD-FUDGE / CD-Q fit value heads on (Mudgal et al. 2024) and
the y ~ p of CAN's dual D̂(λ) (Huang et al., arXiv 2405.19544; `alignserve dual`).

`--server URL` draws the same rows from a running alignserve through its API instead
(valuenet/http_rollouts.py), with the server's scorers (`remote:NAME` included); without it a
`remote:NAME` scorer is refused in one line (it lives in a server's configuration).

Resumable: prompts whose id already has rows are skipped; a folder written with a different
model, K, max_tokens, temperature or scorers is refused rather than mixed. When nothing is
left to do the engine is never started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from decoding.concurrency import gather_all
from decoding.request import DecodeRequest, Objective, Timer
from decoding.types import Sampling
from runtime.prompts import chat_prompt_ids
from runtime.protocols import Runtime

from .data import (  # noqa: F401  (read_rollouts is re-exported for other modules)
    MANIFEST,
    ROWS,
    Manifest,
    Rollout,
    append_rollouts,
    iter_rollouts,
    read_manifest,
    read_rollouts,
    write_manifest,
)

log = logging.getLogger(__name__)

# Manifest fields that define the sampling distribution and the scores: a resumed run must
# match them all, or the folder would mix samples of different distributions.
SAME = ("model", "n", "max_tokens", "temperature", "reward", "cost")


class RolloutError(RuntimeError):
    """The command cannot proceed; the message says why and what to change."""


@dataclass(frozen=True)
class RolloutConfig:
    n: int
    max_tokens: int
    temperature: float
    reward: str
    cost: str | None
    concurrency: int = 16


@dataclass
class Stats:
    prompts: int = 0  # prompts sampled in this run
    rows: int = 0
    tokens: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def save_manifest(folder: Path, manifest: Manifest) -> None:
    """The manifest, written atomically: to a temporary file in the same folder, then renamed
    over the old one (os.replace), so a crash or a full disk mid-write leaves the previous
    manifest whole, never a torn one that would stop every later resume. Same format as
    `data.write_manifest`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)


def repair_torn_tail(folder: Path) -> int:
    """Cut a torn last line off the rows file (a crash or ENOSPC in the middle of an append:
    no final newline, or a last line that is not a JSON object), so that resuming parses the
    file and the next append does not glue a new row onto half an old one. Returns the number
    of bytes cut (0: the file was whole)."""
    path = Path(folder) / ROWS
    if not path.is_file():
        return 0
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        start = _last_line_start(f, size)
        f.seek(start)
        last = f.read()
        if not last or (last.endswith(b"\n") and _is_object(last)):
            return 0
        f.truncate(start)
    log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write", path,
                size - start)
    return size - start


def _last_line_start(f: Any, size: int, chunk: int = 1 << 16) -> int:
    """Offset of the first byte of the file's last line (a final newline belongs to it)."""
    pos = size - 1
    while pos > 0:
        lo = max(0, pos - chunk)
        f.seek(lo)
        i = f.read(pos - lo).rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return 0


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False


def prepare_folder(folder: Path, want: Manifest) -> set[str]:
    """Create the folder's manifest, or check an existing one against `want`; returns the
    prompt ids already sampled (after cutting a torn last row, `repair_torn_tail`)."""
    if not (Path(folder) / MANIFEST).is_file():
        save_manifest(folder, want)
        return set()
    have = read_manifest(folder)
    diff = [f"{k}: folder {getattr(have, k)!r}, now {getattr(want, k)!r}" for k in SAME
            if getattr(have, k) != getattr(want, k)]
    if diff:
        raise RolloutError(f"{folder} holds rollouts drawn with other settings ("
                           + "; ".join(diff) + "); use another --out or the same settings")
    repair_torn_tail(folder)
    counts = Counter(r.prompt_id for r in iter_rollouts(folder))
    short = sorted(p for p, c in counts.items() if c != have.n)
    if short:  # an interrupted write: those prompts are kept, and reported
        log.warning("%d prompt(s) in %s have a sample count other than n=%d: %s",
                    len(short), folder, have.n, ", ".join(short[:5]))
    return set(counts)


def record_prompt(folder: Path, manifest: Manifest, stats: Stats, rows: list, bar: Any,
                  t0: float) -> None:
    """One prompt's rows on disk, the manifest's count and the progress bar. One synchronous
    append per prompt on the event loop: rows of two prompts never interleave, and a prompt is
    either complete on disk or absent after a crash (short of a crash inside this very write)."""
    append_rollouts(folder, rows)
    stats.prompts += 1
    stats.rows += len(rows)
    stats.tokens += sum(len(r.token_ids) for r in rows)
    manifest.count += len(rows)
    save_manifest(folder, manifest)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(tok_s=f"{stats.tokens / (time.perf_counter() - t0):.0f}")


def pending(folder: Path, prompts: list, want: Manifest) -> tuple[list, Manifest | None]:
    """The prompts not yet in `folder` (checked against `want`) and its manifest (None when
    nothing is left to draw)."""
    done = prepare_folder(folder, want)
    todo = [p for p in prompts if p.id not in done]
    if not todo:
        return todo, None
    manifest = read_manifest(folder)
    manifest.count = sum(1 for _ in iter_rollouts(folder))
    return todo, manifest


async def collect(rt: Runtime, prompts: list, cfg: RolloutConfig, folder: Path, manifest: Manifest,
                  bar: Any = None) -> Stats:
    """Sample, score and append every prompt of `prompts` (PromptItem-like: id, prompt).
    `rt` is a runtime.protocols.Runtime (engine with tokenizer, scorer registry, DecodeContext);
    tests pass fakes. A failure cancels the prompts in flight (their engine requests abort)."""
    reward = await rt.scorers.get(cfg.reward)
    cost = await rt.scorers.get(cfg.cost) if cfg.cost else None
    objective = Objective(reward=reward, cost=cost, cost_weight=0.0)
    sampling = Sampling(max_tokens=cfg.max_tokens, temperature=cfg.temperature)
    gate = asyncio.Semaphore(cfg.concurrency)
    stats = Stats()
    t0 = time.perf_counter()

    async def one(item) -> None:
        async with gate:
            ids = chat_prompt_ids(rt.engine.tokenizer, item.prompt)
            req = DecodeRequest(prompt_ids=ids, prompt_text=item.prompt, sampling=sampling,
                                n=cfg.n, objective=objective)
            timer = Timer()
            samples = await rt.ctx.generate(ids, cfg.n, sampling, timer)
            scored = await rt.ctx.score_samples(objective, req, samples, timer)
        rows = [Rollout(prompt_id=item.id, prompt=item.prompt, prompt_ids=list(ids), sample=k,
                        token_ids=list(s.sample.token_ids), logprobs=list(s.sample.logprobs),
                        text=s.sample.text, finish_reason=s.sample.finish_reason,
                        reward=s.reward, cost=s.cost)
                for k, s in enumerate(scored)]
        record_prompt(folder, manifest, stats, rows, bar, t0)

    await gather_all(one(p) for p in prompts)
    stats.wall_s = time.perf_counter() - t0
    return stats


__all__ = ["collect", "chat_prompt_ids", "pending", "prepare_folder", "read_rollouts",
           "RolloutConfig", "RolloutError", "Stats"]
