"""Checks that a policy checkpoint folder can replace the served weights, before the engine is
touched.

vLLM's in-place `reload_weights` keeps the running model (its config, shapes, kernels, KV-cache
layout) and only copies new tensors into it. A checkpoint of another architecture, vocabulary or
size would fail half-way through that copy, leaving a model that is part old and part new, so
everything that can fail is checked here from metadata alone: `config.json`, the JSON headers of
the safetensors files (8-byte little-endian length, then JSON `{name: {dtype, shape,
data_offsets}}`; nothing else of the file is read) and, when both folders ship one, the tokenizer
vocabulary. A truncated weight file is caught too: every tensor's data must lie inside its file.

Errors are `CheckpointError(message, code)`; the admin API turns them into OpenAI-shaped 400s.
With a `root` (the admin API's `policy_root`, server/policy/guard.py) every file read must
resolve inside it, shards named by an index and symlinked files included; a path that does not
exist is reported without echoing it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Fields that fix the parameter shapes or how they are used; any difference breaks the reload or
# silently runs the new weights under the old model's structure.
STRUCTURAL_FIELDS = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "tie_word_embeddings", "hidden_act",
)
# Float dtypes: vLLM casts them into the engine's dtype while copying. Integer/quantized
# tensors would need the quantization config the running engine was not built with.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 100 * 2**20  # a sane header is a few hundred KiB


class CheckpointError(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message, self.code = message, code


@dataclass
class Checkpoint:
    path: Path
    config: dict
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)
    vocab: dict | list | None = field(default=None, repr=False)  # tokenizer.json model.vocab


def is_adapter(path: str | Path) -> bool:
    """A PEFT/LoRA adapter folder (adapter_config.json) rather than a full checkpoint."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


NOT_FOUND = "checkpoint path not found on the server (or outside the policy root)"


def check_inside(file: Path, root: Path | None) -> None:
    """CheckpointError (the generic not-found answer) when `file`, symlinks resolved, lies
    outside `root`; nothing to check without a root."""
    if root is None:
        return
    real, top = os.path.realpath(file), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise CheckpointError(NOT_FOUND, "path_not_found")


def inspect(path: str | Path, root: Path | None = None) -> Checkpoint:
    """Read a checkpoint folder's metadata; CheckpointError when it is not a usable folder
    (or, with `root`, when it or a file it holds resolves outside `root`)."""
    folder = Path(path).expanduser()
    check_inside(folder, root)
    if not folder.exists():
        raise CheckpointError(NOT_FOUND, "path_not_found")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {str(folder)!r} is not a folder (give the folder "
                              "holding config.json and the *.safetensors files)", "path_not_folder")
    folder = folder.resolve()
    config_file = folder / "config.json"
    check_inside(config_file, root)
    if not config_file.is_file():
        raise CheckpointError(f"{str(folder)!r} has no config.json", "missing_config")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"config.json in {str(folder)!r} is not valid JSON: {exc}",
                              "invalid_config") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"config.json in {str(folder)!r} is not a JSON object",
                              "invalid_config")
    return Checkpoint(folder, config, _tensors(folder, root), _vocab(folder, root))


def check_compatible(base: Checkpoint, new: Checkpoint) -> None:
    """Raise CheckpointError unless `new` can be loaded in place of `base`'s weights."""
    diffs = [f"{k} {new.config.get(k)!r} != {base.config.get(k)!r}"
             for k in STRUCTURAL_FIELDS if new.config.get(k) != base.config.get(k)]
    if diffs:
        raise CheckpointError("checkpoint config is incompatible with the served model ("
                              "checkpoint != served): " + "; ".join(diffs),
                              "incompatible_checkpoint")
    missing = sorted(set(base.tensors) - set(new.tensors))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} weight(s) the served model "
                              f"needs, e.g. {_few(missing)}", "incompatible_checkpoint")
    extra = sorted(n for n in set(new.tensors) - set(base.tensors) if not _ignored(n, base))
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} weight(s) the served model does not "
                              f"know, e.g. {_few(extra)}", "incompatible_checkpoint")
    shapes = [f"{n} {list(new.tensors[n][1])} != {list(s)}"
              for n, (_, s) in sorted(base.tensors.items()) if new.tensors[n][1] != s]
    if shapes:
        raise CheckpointError(f"checkpoint weight shapes differ from the served model "
                              f"(checkpoint != served): {_few(shapes)}", "incompatible_checkpoint")
    bad = sorted({d for d, _ in new.tensors.values()} - FLOAT_DTYPES)
    if bad:
        raise CheckpointError(f"checkpoint holds {', '.join(bad)} tensors; only float weights "
                              f"({', '.join(sorted(FLOAT_DTYPES))}) can be reloaded in place",
                              "unsupported_dtype")
    if new.vocab is not None and base.vocab is not None and new.vocab != base.vocab:
        raise CheckpointError("checkpoint tokenizer.json has a different vocabulary from the "
                              "served model's: token ids would mean other tokens",
                              "incompatible_tokenizer")


def _ignored(name: str, base: Checkpoint) -> bool:
    # vLLM's loaders skip these: a tied lm_head is the embedding; inv_freq is recomputed.
    if name == "lm_head.weight" and base.config.get("tie_word_embeddings"):
        return True
    return name.endswith("rotary_emb.inv_freq")


def _few(items: list[str], k: int = 4) -> str:
    return ", ".join(items[:k]) + (f" (+{len(items) - k} more)" if len(items) > k else "")


def _weight_files(folder: Path, root: Path | None = None) -> list[Path]:
    """The files vLLM would read: the shards named by the index when there is one, else every
    *.safetensors file in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index.name} in {str(folder)!r} is unreadable: {exc}",
                                  "invalid_weights") from None
        files = [folder / s for s in shards]
        for f in files:
            check_inside(f, root)
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{str(folder)!r} lacks weight shard(s) named by "
                                  f"{index.name}: {_few(absent)}", "missing_weights")
        return files
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        check_inside(f, root)
    if not files:
        other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
        hint = (f" (found {_few(other)}: convert to safetensors)" if other else "")
        raise CheckpointError(f"{str(folder)!r} has no *.safetensors weight files{hint}",
                              "missing_weights")
    return files


def _tensors(folder: Path, root: Path | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in _weight_files(folder, root):
        for name, (dtype, shape) in read_header(file).items():
            if name in out:
                raise CheckpointError(f"weight {name!r} appears in more than one file of "
                                      f"{str(folder)!r}", "invalid_weights")
            out[name] = (dtype, shape)
    return out


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors header; checks the data fits in the file."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{file.name} in {str(file.parent)!r} is not a valid safetensors "
                               f"file: {why}", "invalid_weights")

    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise bad(f"header length {n} does not fit the file ({size} bytes)")
            meta = json.loads(fh.read(n))
    except OSError as exc:
        raise bad(f"unreadable ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("header is not JSON") from None
    if not isinstance(meta, dict):
        raise bad("header is not a JSON object")
    out = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"entry {name!r} lacks dtype/shape/data_offsets") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise bad(f"entry {name!r} has invalid data_offsets")
        if 8 + n + end > size:
            raise bad(f"truncated: {name!r} ends past the end of the file")
        out[name] = (str(dtype), shape)
    return out


# Bits that are all ones in the exponent of a non-finite value (NaN or ±inf), per dtype: the
# unsigned view of the raw bytes, so BF16 needs no float type numpy lacks.
_EXPONENT = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000),
             "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80)}
_CHUNK_BYTES = 64 * 2**20


def nonfinite_tensors(files: list[Path]) -> list[str]:
    """Names of the float tensors holding a NaN or an infinity. Reads every weight (memory-
    mapped, 64 MiB at a time): one NaN weight makes every activation NaN, and the NaN keys and
    values it writes into the engine's KV cache poison later requests even after the weights
    are restored, so such a checkpoint must never reach the engine."""
    bad = []
    for file in files:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(n))
        data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n)
        for name, info in meta.items():
            if name == "__metadata__" or info.get("dtype") not in _EXPONENT:
                continue
            utype, mask = _EXPONENT[info["dtype"]]
            start, end = info["data_offsets"]
            size = np.dtype(utype).itemsize
            step = _CHUNK_BYTES - _CHUNK_BYTES % size
            for at in range(start, end, step):
                words = data[at:min(end, at + step)].view(utype)
                if np.any((words & utype(mask)) == utype(mask)):
                    bad.append(name)
                    break
        del data
    return bad


def check_finite(path: str | Path) -> None:
    """CheckpointError when a weight of the (already inspected) folder is NaN or infinite."""
    folder = Path(path)
    files = ([folder / "adapter_model.safetensors"] if (folder / "adapter_config.json").is_file()
             else _weight_files(folder))
    bad = nonfinite_tensors(files)
    if bad:
        raise CheckpointError(f"checkpoint holds non-finite weights (NaN or inf) in "
                              f"{len(bad)} tensor(s), e.g. {_few(bad)}", "nonfinite_weights")


def _vocab(folder: Path, root: Path | None = None) -> dict | list | None:
    file = folder / "tokenizer.json"
    check_inside(file, root)
    if not file.is_file():
        return None  # weights-only checkpoint: the served tokenizer stays in use
    try:
        vocab = json.loads(file.read_text())["model"]["vocab"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"tokenizer.json in {str(folder)!r} is unreadable: {exc}",
                              "invalid_tokenizer") from None
    return vocab if isinstance(vocab, (dict, list)) else None


def check_adapter(path: str | Path, base: Checkpoint, max_rank: int,
                  root: Path | None = None) -> Path:
    """A PEFT LoRA adapter folder that fits the served model: rank within the engine's limit,
    and every lora_A [r, in] / lora_B [out, r] pair matching the base weight [out, in] it
    adapts. Returns the resolved folder."""
    check_inside(Path(path).expanduser(), root)
    folder = Path(path).expanduser().resolve()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        check_inside(folder / name, root)
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        rank = int(cfg.get("r", 0))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"adapter_config.json in {str(folder)!r} is unreadable: {exc}",
                              "invalid_config") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"adapter type {cfg.get('peft_type')!r} is not LoRA",
                              "unsupported_adapter")
    if not 0 < rank <= max_rank:
        raise CheckpointError(f"adapter rank {rank} is outside 1..{max_rank} (the server's "
                              "max_lora_rank)", "unsupported_adapter")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{str(folder)!r} has no adapter_model.safetensors",
                              "missing_weights")
    bad = []
    for name, (_, shape) in read_header(weights).items():
        target, _, part = name.removeprefix("base_model.model.").rpartition(".lora_")
        base_shape = base.tensors.get(f"{target}.weight", (None, None))[1]
        if base_shape is None or len(shape) != 2:
            bad.append(f"{name} (no base weight {target}.weight)")
        elif part == "A.weight" and tuple(shape) != (rank, base_shape[1]):
            bad.append(f"{name} {list(shape)} != {[rank, base_shape[1]]}")
        elif part == "B.weight" and tuple(shape) != (base_shape[0], rank):
            bad.append(f"{name} {list(shape)} != {[base_shape[0], rank]}")
    if bad:
        raise CheckpointError(f"adapter does not fit the served model: {_few(bad)}",
                              "incompatible_checkpoint")
    return folder
