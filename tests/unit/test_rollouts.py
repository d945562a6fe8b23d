"""`alignserve rollouts` logic on fakes: rows, chat-templated prompt ids, resume, refusals."""

from dataclasses import replace

import pytest
from fakes import FakeEngine, WordReward

from decoding.protocols import DecodeContext
from evaluation.plan import PromptItem
from server.scorers import ScorerRegistry
from server.serving import Runtime
from valuenet.data import Manifest, read_manifest
from valuenet.rollouts import (
    RolloutConfig,
    RolloutError,
    chat_prompt_ids,
    collect,
    prepare_folder,
    read_rollouts,
)

PROMPTS = [PromptItem(f"p{i}", f"tell me something {w}", "helpful")
           for i, w in enumerate(["good", "nice", "great"])]
CFG = RolloutConfig(n=3, max_tokens=6, temperature=1.0, reward="good_count", cost="bad_count",
                    concurrency=2)


def runtime(engine):
    scorers = ScorerRegistry({"good_count": WordReward,
                              "bad_count": lambda: WordReward("bad", "bad_count")}, None)
    return Runtime(engine=engine, scorers=scorers, ctx=DecodeContext(engine), model_name="fake")


def manifest(cfg=CFG, **kw):
    return Manifest(model="fake", prompts="p.jsonl", n=cfg.n, max_tokens=cfg.max_tokens,
                    temperature=cfg.temperature, reward=cfg.reward, cost=cfg.cost, **kw)


async def run_prompts(folder, prompts, engine):
    done = prepare_folder(folder, manifest())
    todo = [p for p in prompts if p.id not in done]
    m = read_manifest(folder)
    m.count = len(read_rollouts(folder)[1])
    return await collect(runtime(engine), todo, CFG, folder, m)


async def test_rows_are_complete_and_scored(tmp_path):
    engine = FakeEngine(seed=1)
    stats = await run_prompts(tmp_path, PROMPTS[:2], engine)
    m, rows = read_rollouts(tmp_path)
    assert stats.rows == len(rows) == 6 and m.count == 6
    assert [c[1] for c in engine.calls] == [3, 3]  # one engine request with n=K per prompt
    for row in rows:
        prompt = next(p for p in PROMPTS if p.id == row.prompt_id)
        assert row.prompt == prompt.prompt
        assert row.prompt_ids == chat_prompt_ids(engine.tokenizer, prompt.prompt)
        assert len(row.logprobs) == len(row.token_ids) >= 1
        assert engine.tokenizer.decode(row.token_ids) == row.text
        assert row.reward == row.text.split().count("good")
        assert row.cost == row.text.split().count("bad")
    assert sorted((r.prompt_id, r.sample) for r in rows) == [(p, k) for p in ("p0", "p1")
                                                             for k in range(3)]
    assert stats.tokens == sum(len(r.token_ids) for r in rows)


async def test_resume_skips_done_prompts(tmp_path):
    await run_prompts(tmp_path, PROMPTS[:2], FakeEngine(seed=1))
    first = read_rollouts(tmp_path)[1]
    engine = FakeEngine(seed=2)
    stats = await run_prompts(tmp_path, PROMPTS, engine)
    m, rows = read_rollouts(tmp_path)
    assert stats.prompts == 1 and len(engine.calls) == 1  # only p2 was sampled
    assert rows[:6] == first and len(rows) == 9 and m.count == 9
    assert {r.prompt_id for r in rows[6:]} == {"p2"}


@pytest.mark.parametrize("change", [{"n": 4}, {"max_tokens": 7}, {"temperature": 0.7},
                                    {"reward": "x"}, {"cost": None}, {"model": "other"}])
def test_refuses_to_mix_settings(tmp_path, change):
    prepare_folder(tmp_path, manifest())
    with pytest.raises(RolloutError, match=next(iter(change))):
        prepare_folder(tmp_path, replace(manifest(), **change))
    prepare_folder(tmp_path, replace(manifest(), prompts="other.jsonl"))  # more prompts: fine


async def test_scorer_failure_writes_no_rows_and_leaves_no_requests(tmp_path):
    engine = FakeEngine(seed=1)
    rt = runtime(engine)
    rt.scorers.register(type("Boom", (), {"name": "boom", "score": lambda *a: 1 / 0})())
    prepare_folder(tmp_path, manifest())
    with pytest.raises(ZeroDivisionError):
        await collect(rt, PROMPTS, replace(CFG, reward="boom"), tmp_path, read_manifest(tmp_path))
    assert read_rollouts(tmp_path)[1] == [] and engine.active == 0
