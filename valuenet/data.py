"""Rollout files: what `alignserve rollouts` writes and the offline trainers read.

A rollout folder holds
- `manifest.json`: how the samples were drawn (model, prompts file, n, max_tokens, temperature,
  reward and cost scorer names, row count, creation time);
- `rollouts.jsonl`: one line per sample, appended as prompts finish, so an interrupted run
  resumes by skipping the prompts already present.

`prompt_ids` are the chat-templated prompt tokens exactly as the engine saw them and
`token_ids` the sampled ids (never re-tokenised text), so a value head trained on these rows
sees the same ids the server later scores. `logprobs` are the reference policy's per-token
log-probabilities of the sampled tokens (after temperature / top-p).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
ROWS = "rollouts.jsonl"


@dataclass
class Rollout:
    prompt_id: str
    prompt: str  # the user text (what text scorers see)
    prompt_ids: list[int]
    sample: int  # index k of this sample among the prompt's K
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None
    reward: float
    cost: float | None = None


@dataclass
class Manifest:
    model: str
    prompts: str
    n: int
    max_tokens: int
    temperature: float
    reward: str
    cost: str | None = None
    count: int = 0
    created: str = ""
    extra: dict = field(default_factory=dict)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a rollout folder (no {MANIFEST})")
    return Manifest(**json.loads(path.read_text()))


def append_rollouts(folder: Path, rows: Iterable[Rollout]) -> None:
    with (Path(folder) / ROWS).open("a") as f:
        for row in rows:
            f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")


def iter_rollouts(folder: Path) -> Iterator[Rollout]:
    path = Path(folder) / ROWS
    if not path.is_file():
        return
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Rollout(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: not a rollout row ({exc})") from exc


def read_rollouts(folder: Path) -> tuple[Manifest, list[Rollout]]:
    """The manifest and every row of a rollout folder."""
    return read_manifest(folder), list(iter_rollouts(folder))
