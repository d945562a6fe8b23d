"""`alignserve rollouts` logic on fakes: rows, chat-templated prompt ids, resume, refusals."""

from dataclasses import replace

import pytest
from fakes import FakeEngine, WordReward

from decoding.context import DecodeContext
from runtime.prompts import PromptItem, chat_prompt_ids
from runtime.protocols import Runtime
from runtime.scorers import ScorerRegistry
from valuenet.data import Manifest, read_manifest
from valuenet.rollouts import (
    RolloutConfig,
    RolloutError,
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


# ---------------------------------------------------------------- --server (HTTP API)


def _http_client(engine):
    import httpx
    from fakes import make_app

    from valuenet.http_rollouts import RolloutClient

    app = make_app(engine)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return RolloutClient("http://test", client=httpx.AsyncClient(transport=transport,
                                                                 base_url="http://test"))


async def test_server_rollouts_match_the_in_process_rows(tmp_path):
    from valuenet.http_rollouts import collect_http, server_manifest

    engine = FakeEngine(seed=2)
    client = await _http_client(engine).start()
    cfg = replace(CFG, reward="good_count", cost="bad_count")
    want = server_manifest(client, tmp_path / "p.jsonl", cfg, "now")
    assert want.model == "fake" and want.extra["server"] == "http://test"
    prepare_folder(tmp_path, want)
    stats = await collect_http(client, PROMPTS[:2], cfg, tmp_path, read_manifest(tmp_path))
    m, rows = read_rollouts(tmp_path)
    assert stats.rows == len(rows) == m.count == 6
    # one best-of-K request per prompt, with the reference distribution's controls
    assert [c[1] for c in engine.calls] == [3, 3]
    for _, _, s in engine.calls:
        assert (s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (1.0, 0, 0.0, 1.0)
    for row in rows:
        prompt = next(p for p in PROMPTS if p.id == row.prompt_id)
        assert row.prompt_ids == chat_prompt_ids(engine.tokenizer, prompt.prompt)
        assert len(row.logprobs) == len(row.token_ids) >= 1
        assert engine.tokenizer.decode(row.token_ids) == row.text
        assert row.reward == row.text.split().count("good")
        assert row.cost == row.text.split().count("bad")
    assert sorted((r.prompt_id, r.sample) for r in rows) == [
        (p, k) for p in ("p0", "p1") for k in range(3)]
    # resumable: the same folder continues with the remaining prompt only
    done = prepare_folder(tmp_path, want)
    await collect_http(client, [p for p in PROMPTS if p.id not in done], cfg, tmp_path,
                       read_manifest(tmp_path))
    assert len(read_rollouts(tmp_path)[1]) == 9 and len(engine.calls) == 3
    await client.aclose()


async def test_server_errors_are_one_line(tmp_path):
    from valuenet.http_rollouts import ServerError, collect_http

    client = await _http_client(FakeEngine()).start()
    with pytest.raises(ServerError, match="HTTP 400: .*unknown scorer"):
        await collect_http(client, PROMPTS[:1], replace(CFG, reward="nope"), tmp_path,
                           manifest())
    await client.aclose()


def _ns(tmp_path, **kw):
    import argparse

    from valuenet.rollouts_cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi"}\n')
    args = ["--prompts", str(prompts), "--out", str(tmp_path / "out")]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(args)


def test_remote_scorers_need_a_server(tmp_path, capsys):
    from valuenet.rollouts_cli import run

    assert run(_ns(tmp_path, reward="remote:rm")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "remote:rm" in err and "--server" in err


def test_unreachable_server_is_one_line_exit_2(tmp_path, capsys):
    import socket

    from valuenet.rollouts_cli import run

    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert run(_ns(tmp_path, server=f"http://127.0.0.1:{port}", reward="remote:rm")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"127.0.0.1:{port}/v1/models" in err


def test_eval_refuses_remote_scorers_in_process(tmp_path):
    import argparse

    from evaluation.cli import _validate, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi"}\n')
    ns = p.parse_args(["--prompts", str(prompts), "--out", str(tmp_path), "--reward",
                       "remote:rm"])
    with pytest.raises(ValueError, match="remote:rm.*--server"):
        _validate(ns)
    ns.server = "http://x"
    _validate(ns)  # the server resolves it


def test_registry_names_where_remote_scorers_come_from():
    from runtime.scorers import UnknownScorer

    reg = ScorerRegistry({}, None)
    with pytest.raises(UnknownScorer, match="--remote-scorer NAME=URL"):
        reg.load_now("remote:rm")
