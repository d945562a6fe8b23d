"""What every `alignserve finetune` method shares: its program name in messages and the base
policy's resolution (a library module: the command halves import it, never the other way round).
"""

from __future__ import annotations

from pathlib import Path

PROG = "alignserve finetune"


def resolve_model(name: str, home: Path | None) -> str:
    """The base policy for `from_pretrained` (runtime.startup.resolve_model: 'embedded', a
    folder or an HF id); a folder must hold a config.json."""
    from runtime.startup import resolve_model as resolve

    model = resolve(name, home)
    if Path(model).is_dir() and not (Path(model) / "config.json").is_file():
        raise ValueError(f"--model {name}: no config.json in that folder")
    return model
