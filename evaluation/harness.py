"""Runs the plan: every setting on every prompt, `samples` answers each, through a `Runner`,
with a progress bar.

Settings run one after another so that their wall times do not overlap; within a setting up to
`concurrency` answers are in flight at once (the engine batches them, as the server would).
A failed request cancels the rest of its setting and ends the evaluation (no partial numbers).
Answer k to a prompt under a setting is seeded with `derive_seed(seed, prompt id, setting
label, k)` (decoding/seeds.py): reproducible, and independent across samples and settings —
the win rate compares independent draws, as Beirami et al.'s n/(n+1) assumes. Seed None:
unseeded, every answer an independent draw of the engine.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from decoding.concurrency import gather_all
from decoding.seeds import derive_seed
from runtime.prompts import PromptItem

from .metrics import Row, harmless_flag, summarize_setting
from .plan import BASE, Setting
from .runners import Runner


@dataclass
class SettingRun:
    setting: Setting
    rows: list[Row]
    wall_s: float


async def run_plan(runner: Runner, prompts: list[PromptItem], plan: list[Setting],
                   harmless_threshold: float | None, concurrency: int = 8,
                   progress: Any = None, samples: int = 1,
                   seed: int | None = None) -> list[SettingRun]:
    """`progress`: anything with `update(k)` and `set_postfix_str(s)` (a tqdm bar)."""
    runs = []
    for setting in plan:
        if progress is not None:
            progress.set_postfix_str(setting.label)
        gate = asyncio.Semaphore(concurrency)

        async def one(item: PromptItem, k: int, setting: Setting = setting,
                      gate: asyncio.Semaphore = gate) -> Row:
            async with gate:
                a = await runner.answer(item, setting, derive_seed(seed, item.id, setting.label, k))
            if progress is not None:
                progress.update(1)
            return Row(prompt_id=item.id, kind=item.kind, prompt=item.prompt,
                       strategy=setting.strategy, n=setting.n, answer=a.text, reward=a.reward,
                       cost=a.cost, harmless=harmless_flag(a.cost, harmless_threshold),
                       kl_bound=a.kl_bound, kl_estimate=a.kl_estimate,
                       generated_tokens=a.generated_tokens, wall_s=a.wall_s, sample=k,
                       panel_best=a.panel_terms[0] if a.panel_terms else None,
                       panel_achieved=a.panel_terms[1] if a.panel_terms else None)

        t0 = time.perf_counter()
        rows = await gather_all(one(p, k) for p in prompts for k in range(samples))
        runs.append(SettingRun(setting, rows, time.perf_counter() - t0))
    return runs


def summaries(runs: list[SettingRun]) -> list[dict]:
    """One entry per setting for results.json: its numbers (see `metrics`), then its answers."""
    base = next((r.rows for r in runs if r.setting.strategy == BASE), None)
    out = []
    for run in runs:
        s = run.setting
        out.append({"strategy": s.strategy, "n": s.n, "label": s.label, "options": s.options,
                    **summarize_setting(run.rows, base, run.wall_s),
                    "answers": [r.to_dict() for r in run.rows]})
    return out
