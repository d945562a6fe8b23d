"""Prompts of the offline tools: the prompt files (`load_prompts`) and the token ids the
server's chat path sends the engine for one user message (`chat_prompt_ids`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .protocols import Tokenizer


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: str
    kind: str
    prefill: str = ""  # the start of the assistant's answer, continued (evaluation/prefill.py)


def load_prompts(path: Path, limit: int | None = None) -> list[PromptItem]:
    """`{"id", "prompt", "kind"}` per line; a missing id is the line number, a missing kind
    'unspecified'. Duplicate ids are refused: answers are matched to the base's by id."""
    items = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        obj = json.loads(line)
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise ValueError(f"{path}:{i + 1}: each line needs a non-empty string 'prompt'")
        items.append(PromptItem(str(obj.get("id", i)), obj["prompt"],
                                str(obj.get("kind", "unspecified"))))
    ids = [p.id for p in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: prompt ids must be unique")
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items[:limit] if limit else items


def prompt_texts(path: Path, limit: int | None = None, mixed: bool = False) -> list[str]:
    """Just the prompts of `load_prompts` (the benchmarks need no ids). `mixed`: alternate
    helpful and adversarial ones (`kind`) before the limit, so that a short run serves both."""
    items = load_prompts(path)
    if mixed:
        helpful = [p for p in items if p.kind != "adversarial"]
        adversarial = [p for p in items if p.kind == "adversarial"]
        items = [p for pair in zip(helpful, adversarial) for p in pair]
    return [p.prompt for p in items][:limit or None]


def chat_prompt_ids(tokenizer: Tokenizer, prompt: str, prefill: str = "") -> list[int]:
    """The server's chat path (server/serving/endpoints.py `chat_prompt`) for one user message: the
    model's chat template with the generation prompt, then no extra special tokens. With a
    `prefill`, the assistant turn starts with it and stays open (`continue_final_message`)."""
    messages = [{"role": "user", "content": prompt}]
    if not prefill:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": prefill}], tokenize=False,
            add_generation_prompt=False, continue_final_message=True)
    return tokenizer.encode(text, add_special_tokens=False)
