"""Preference pairs in the PKU-SafeRLHF schema: loading, validation, train/held-out split.

Schema (one pair per row; Ji et al. 2024, PKU-SafeRLHF):

    prompt, response_0, response_1            strings
    is_response_0_safe, is_response_1_safe    booleans (0/1 accepted)
    better_response_id, safer_response_id     0 or 1

Sources, in the order tried by `load_pairs`:
- a local `.jsonl` / `.json` file (read here, so errors name the line);
- a local folder: a `Dataset.save_to_disk` folder (`datasets.load_from_disk`) or any folder
  `datasets.load_dataset` understands (JSON/CSV/Parquet files);
- anything else is a `datasets` name and goes through `datasets.load_dataset(name, split=...)`
  (a hub id needs network access, which this machine has not).

Standard library only at module level: the CLI parser imports this package at every start.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
          "better_response_id", "safer_response_id")


class PairSchemaError(ValueError):
    """A preference row does not follow the PKU-SafeRLHF schema (message says where and why)."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    responses: tuple[str, str]
    safe: tuple[bool, bool]
    better: int  # index of the more helpful response (y_w)
    safer: int

    @classmethod
    def from_row(cls, row: Mapping, where: str) -> PreferencePair:
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise PairSchemaError(
                f"{where}: missing field(s) {', '.join(missing)}; a PKU-SafeRLHF pair has "
                f"{', '.join(FIELDS)}")
        for f in ("prompt", "response_0", "response_1"):
            if not isinstance(row[f], str) or not row[f].strip():
                raise PairSchemaError(f"{where}: {f} must be a non-empty string, got {row[f]!r}")
        safe = tuple(_as_bool(row[f], f, where) for f in ("is_response_0_safe", "is_response_1_safe"))
        ids = [_as_index(row[f], f, where) for f in ("better_response_id", "safer_response_id")]
        return cls(row["prompt"], (row["response_0"], row["response_1"]), safe, ids[0], ids[1])

    def to_row(self) -> dict:
        return {"prompt": self.prompt, "response_0": self.responses[0],
                "response_1": self.responses[1], "is_response_0_safe": self.safe[0],
                "is_response_1_safe": self.safe[1], "better_response_id": self.better,
                "safer_response_id": self.safer}


def _as_bool(value, field: str, where: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise PairSchemaError(f"{where}: {field} must be a boolean, got {value!r}")


def _as_index(value, field: str, where: str) -> int:
    if not isinstance(value, bool) and value in (0, 1):
        return int(value)
    raise PairSchemaError(f"{where}: {field} must be 0 or 1, got {value!r}")


def _read_json_lines(path: Path) -> Iterable[tuple[dict, str]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
        yield from ((r, f"{path} item {i}") for i, r in enumerate(rows))
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PairSchemaError(f"{path} line {n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise PairSchemaError(f"{path} line {n}: expected a JSON object")
        yield row, f"{path} line {n}"


def _read_datasets(source: str, split: str) -> Iterable[tuple[dict, str]]:
    import datasets

    local = Path(source).expanduser()
    if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise PairSchemaError(f"{source}: no split {split!r} (has {', '.join(ds)})")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(str(local) if local.is_dir() else source, split=split)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"preference data {source!r}: {exc}") from None
        except Exception as exc:  # DatasetNotFoundError, ConnectionError, ... (no hub here)
            raise PairSchemaError(
                f"could not load dataset {source!r} (split {split!r}): {type(exc).__name__}: {exc}"
            ) from None
    return ((row, f"{source}[{split}] row {i}") for i, row in enumerate(ds))


def load_pairs(source: str | Path, split: str = "train", limit: int | None = None
               ) -> list[PreferencePair]:
    """Read and validate preference pairs (see the module docstring for the sources)."""
    path = Path(source).expanduser()
    if path.is_file():
        rows = _read_json_lines(path)
    elif path.suffix in (".jsonl", ".json") and not path.exists():
        raise FileNotFoundError(f"preference data {str(source)!r} does not exist")
    else:
        rows = _read_datasets(str(source), split)
    pairs = []
    for row, where in rows:
        if limit is not None and len(pairs) >= limit:
            break
        pairs.append(PreferencePair.from_row(row, where))
    if not pairs:
        raise PairSchemaError(f"{source}: no preference pairs")
    return pairs


def split_pairs(pairs: list, held_out: float, seed: int) -> tuple[list, list]:
    """Deterministic shuffle, then (train, held-out); held-out gets round(held_out·n) items,
    at least one when held_out > 0 and there are two or more pairs."""
    if not 0 <= held_out < 1:
        raise ValueError(f"held-out fraction must lie in [0, 1), got {held_out}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    k = round(held_out * len(pairs))
    if held_out > 0 and len(pairs) >= 2:
        k = min(max(k, 1), len(pairs) - 1)
    return [pairs[i] for i in order[k:]], [pairs[i] for i in order[:k]]
