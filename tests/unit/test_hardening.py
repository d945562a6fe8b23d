"""What a hostile or unlucky client, scorer or disk can do to a running server (issue 25), on
the fakes: request-time model loading is refused, non-finite scores fail cleanly and JSON out is
strict, a chunked body over the limit is a 413, the access log cannot be forged, and the CD-Q
record writes and rollout files survive a full disk or a torn write."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from collections.abc import Sequence

import httpx
import pytest
from fakes import FakeEngine, WordReward, make_app
from prometheus_client import CollectorRegistry

import runtime.scorers as scorers_mod
from decoding.request import DecodeRequest
from decoding.types import Sample, Sampling
from runtime.batching import BatchingContext, NonFiniteScore, ScoreBatcher, check_finite
from runtime.protocols import Runtime
from runtime.scorers import ScorerRegistry, UnknownScorer
from runtime.settings import ConfigError
from server.errors import to_api_error

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test")


class LoadSpy:
    """Stands in for HFRewardScorer: records every load (a real one would hit the hub/disk)."""

    loads: list[str] = []

    def __init__(self, name_or_path: str, **kw) -> None:
        LoadSpy.loads.append(name_or_path)
        if not name_or_path.startswith("good"):
            raise OSError(f"{name_or_path} is not a folder or a hub id")
        self.name = f"hf:{name_or_path}"

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return [1.0] * len(responses)


@pytest.fixture
def spy(monkeypatch):
    LoadSpy.loads = []
    monkeypatch.setattr(scorers_mod, "HFRewardScorer", LoadSpy)
    return LoadSpy


# ---------------------------------------------------------------- 1. request-time model loading


@pytest.mark.parametrize("name", ["hf:gpt2", "hf:/etc", "hf:/nonexistent/model", "hf:good",
                                  "remote:rm", "nope", "hf:"])
async def test_a_request_cannot_load_a_model(spy, name):
    app = make_app()
    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", json={
            **CHAT, "alignment": {"strategy": "best_of_n", "n": 2, "reward": name}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "unknown_scorer" and err["param"] == "alignment.reward"
    assert spy.loads == []  # nothing was loaded, nothing looked up on disk
    # one message for every unknown name: it neither echoes the name nor says if it exists
    assert err["message"] == ("unknown scorer: this server serves only the scorers it was "
                              "started with: bad_count, exploding, fixed, good_count")


async def test_cost_and_value_are_refused_the_same_way(spy):
    app = make_app()
    async with _client(app) as c:
        cost = await c.post("/v1/chat/completions", json={
            **CHAT, "alignment": {"strategy": "best_of_n", "n": 2, "cost": "hf:/etc"}})
        value = await c.post("/v1/chat/completions", json={
            **CHAT, "alignment": {"strategy": "blockwise_cd", "n": 2, "value": "hf:/etc"}})
    for r, param in ((cost, "alignment.cost"), (value, "alignment.value")):
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_scorer", r.text
        assert r.json()["error"]["param"] == param and "/etc" not in r.text
    assert spy.loads == []


async def test_operator_configured_hf_scorers_load_at_start_up_and_serve(spy):
    app = make_app(default_reward="hf:good-rm")
    assert spy.loads == ["good-rm"]  # loaded by build_app, before any request
    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", json={
            **CHAT, "alignment": {"strategy": "best_of_n", "n": 2, "reward": "hf:good-rm"}})
    assert r.status_code == 200, r.text
    assert r.json()["alignment"]["reward"] == 1.0 and spy.loads == ["good-rm"]


async def test_a_preset_s_hf_scorer_is_loaded_at_start_up(spy):
    app = make_app(presets={"judged": {"strategy": "best_of_n", "n": 2,
                                       "reward": "hf:good-preset"}})
    assert spy.loads == ["good-preset"]
    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "judged"})
    assert r.status_code == 200, r.text
    assert r.json()["alignment"]["reward"] == 1.0


def test_a_configured_hf_scorer_that_does_not_load_stops_start_up(spy):
    with pytest.raises(ConfigError, match="scorers: could not load reward model '/missing'"):
        make_app(default_reward="hf:/missing")


async def test_offline_registries_still_load_hf_scorers(spy):
    """rollouts, eval, dual and finetune take `hf:` names from their own command line."""
    reg = ScorerRegistry({}, None)
    assert not reg.sealed
    assert (await reg.get("hf:good-offline")).name == "hf:good-offline"
    with pytest.raises(UnknownScorer, match="could not load reward model '/x'"):
        await reg.get("hf:/x")  # the operator's own command: the reason helps
    assert spy.loads == ["good-offline", "/x"]


async def test_a_sealed_registry_serves_built_ins_and_what_it_loaded(spy):
    reg = ScorerRegistry({"good_count": WordReward}, None)
    reg.preload(["hf:good-a"])
    reg.seal()
    assert (await reg.get("good_count")).name == "good_count"  # built-in, loaded lazily
    assert (await reg.get("hf:good-a")).name == "hf:good-a"
    with pytest.raises(UnknownScorer) as info:
        await reg.get("hf:good-b")
    assert "good-b" not in str(info.value) and spy.loads == ["good-a"]
    assert reg.names() == ["good_count", "hf:good-a"]


# ---------------------------------------------------------------- 4. non-finite numbers


class Scores:
    def __init__(self, values: list[float], name: str = "fixed") -> None:
        self.values, self.name = values, name

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return self.values[: len(responses)]


def _request(n: int) -> DecodeRequest:
    return DecodeRequest(prompt_ids=[1], prompt_text="hi", sampling=Sampling(max_tokens=2), n=n)


def _samples(n: int) -> list[Sample]:
    return [Sample([i], f" w{i}", [0.0], "stop") for i in range(n)]


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
async def test_a_non_finite_score_is_an_error_not_a_choice(batched, bad):
    batcher = ScoreBatcher(None, window_s=0.0, max_batch=8) if batched else None
    ctx = BatchingContext(FakeEngine(), batcher=batcher)
    scorer = Scores([1.0, bad, 2.0])
    with pytest.raises(NonFiniteScore, match="scorer fixed returned a non-finite score"):
        await ctx.score(scorer, _request(3), _samples(3))
    assert await ctx.score(Scores([1.0, 3.0, 2.0]), _request(3), _samples(3)) == [1.0, 3.0, 2.0]


def test_non_finite_errors_map_to_clean_answers():
    local = to_api_error(NonFiniteScore("relevance", 1, 4))
    assert (local.status, local.code, local.type) == (500, "invalid_score", "server_error")
    remote = to_api_error(NonFiniteScore("remote:rm", 1, 4))
    assert (remote.status, remote.code) == (502, "reward_model_error")
    assert check_finite("x", [1, 2.5]) == [1.0, 2.5]


def _checked_app(scorer, **overrides):
    """make_app with the runtime's checked context (runtime/startup.py: BatchingContext)."""
    from server.app import build_app
    from server.settings import Settings

    engine = FakeEngine()
    reg = ScorerRegistry({"good_count": WordReward, "nan": lambda: scorer}, None)
    settings = Settings(default_reward="good_count", max_n=16, max_choices=4,
                        max_tokens_limit=64, max_prompt_tokens=40, **overrides)
    rt = Runtime(engine=engine, scorers=reg, ctx=BatchingContext(engine), model_name="fake")
    return build_app(settings, rt, registry=CollectorRegistry())


@pytest.mark.parametrize("strategy", ["best_of_n", "soft_best_of_n", "speculative_rejection"])
async def test_a_nan_scorer_fails_the_request_cleanly(strategy):
    app = _checked_app(Scores([math.nan] * 64, name="nan"))
    body = {**CHAT, "alignment": {"strategy": strategy, "n": 4, "reward": "nan"}}
    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", json=body)
        s = await c.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 500 and r.json()["error"]["code"] == "invalid_score", r.text
    assert "non-finite" in r.json()["error"]["message"]
    assert '"invalid_score"' in s.text and "NaN" not in s.text


def test_strict_json_writes_null_for_non_finite_numbers():
    from server.serving.render import StrictJSONResponse, strict_dumps

    obj = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": {"d": (2, math.nan)}, "e": "NaN"}
    assert strict_dumps(obj) == '{"a":null,"b":[null,null,1.5],"c":{"d":[2,null]},"e":"NaN"}'
    assert json.loads(StrictJSONResponse(obj).body) == json.loads(strict_dumps(obj))


async def test_a_minus_infinity_logprob_renders_as_null_not_500():
    engine = FakeEngine()
    engine.next_logprobs = {0: 0.0, 1: -math.inf}  # a token the policy rules out
    app = make_app(engine)
    body = {**CHAT, "logprobs": True, "top_logprobs": 2}
    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", json=body)
        s = await c.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert sorted((t["logprob"] is None) for t in top) == [False, True]
    assert "Infinity" not in s.text and "NaN" not in s.text
    for line in s.text.splitlines():  # every event is strict JSON
        if line.startswith("data: {"):
            json.loads(line[6:], parse_constant=lambda c: pytest.fail(f"literal {c}"))


# ---------------------------------------------------------------- 6. body limit and access log


async def test_a_chunked_body_over_the_limit_is_413():
    app = make_app(max_body_bytes=2048)

    async def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 512
        yield b'"}]}'

    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", content=chunks(),
                         headers={"content-type": "application/json"})
        small = await c.post("/v1/chat/completions", content=_one(json.dumps(CHAT).encode()),
                             headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers  # really chunked
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200, small.text


async def _one(data: bytes):
    yield data


async def test_control_characters_in_the_path_cannot_forge_log_lines(caplog):
    app = make_app()
    caplog.set_level(logging.INFO, logger="alignserve.access")
    async with _client(app) as c:
        await c.get("/v1/models%0A2026-01-01%20INFO%20alignserve.access%20GET%20/admin%20200"
                    "%1b[2J")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "alignserve.access"]
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith("GET /v1/models\\n2026-01-01\\x20INFO")
    assert "\\x1b[2J" in line


def test_log_safe_keeps_ordinary_text():
    from server.observability.request_ids import log_safe

    assert log_safe("/v1/chat/completions") == "/v1/chat/completions"
    assert log_safe("é ü") == "é ü"
    assert log_safe("a\r\nb\u2028") == "a\\r\\nb\\u2028"
    assert len(log_safe("x" * 10_000)) == 2048 + 3


# ---------------------------------------------------------------- 12. disk


def _tilt(tmp_path):
    from heads.processor import CdqTilt, TiltArgs, _Req

    tilt = CdqTilt(heads={}, stats_dir=str(tmp_path))
    reqs = [_Req(TiltArgs("value:q", 1.0, f"{i:016x}"), [1, 2], [], 1.0) for i in range(2)]
    return tilt, reqs


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EMFILE])
def test_cdq_records_stop_on_a_full_disk_instead_of_killing_the_engine(tmp_path, monkeypatch,
                                                                      caplog, err):
    from heads import processor

    tilt, reqs = _tilt(tmp_path)
    tilt._record(reqs, [0, 0], [0.1, 0.2], [1.0, 1.0])  # works while the disk has room
    calls = []

    def failing(*a, **kw):
        calls.append(a)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(processor.os, "write", failing)
    monkeypatch.setattr(processor.os, "open", failing)
    with caplog.at_level(logging.ERROR, logger="heads.processor"):
        for step in range(1, 4):
            tilt._record(reqs, [step, step], [0.1, 0.2], [1.0, 1.0])  # never raises
    assert tilt.recording_failed and len(calls) == 1  # tried once, then stopped
    assert len([r for r in caplog.records if "records disabled" in r.getMessage()]) == 1
    kls, _ = processor.read_steps(tmp_path, reqs[0].args.key)
    assert kls == [0.1]  # what was written before stays readable
    for r in reqs:
        r.close()


def test_a_short_record_write_stops_recording(tmp_path, monkeypatch):
    from heads import processor

    tilt, reqs = _tilt(tmp_path)
    real = os.write
    monkeypatch.setattr(processor.os, "write", lambda fd, data: real(fd, data[:5]))
    tilt._record(reqs, [0, 0], [0.1, 0.2], [1.0, 1.0])
    assert tilt.recording_failed
    assert processor.read_steps(tmp_path, reqs[0].args.key) == ([], [])  # torn: skipped
    for r in reqs:
        r.close()


def _manifest():
    from valuenet.data import Manifest

    return Manifest(model="m", prompts="p.jsonl", n=2, max_tokens=4, temperature=1.0,
                    reward="good_count")


def _row(pid: str, k: int):
    from valuenet.data import Rollout

    return Rollout(prompt_id=pid, prompt="hi", prompt_ids=[1], sample=k, token_ids=[2],
                   logprobs=[-0.5], text=" good", finish_reason="stop", reward=1.0)


def test_manifest_writes_are_atomic(tmp_path, monkeypatch):
    from valuenet import rollouts
    from valuenet.data import read_manifest

    m = _manifest()
    rollouts.save_manifest(tmp_path, m)
    m.count = 7

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rollouts.os, "replace", full_disk)
    with pytest.raises(OSError):
        rollouts.save_manifest(tmp_path, m)
    assert read_manifest(tmp_path).count == 0  # the old manifest, whole
    monkeypatch.undo()
    rollouts.save_manifest(tmp_path, m)
    assert read_manifest(tmp_path).count == 7


@pytest.mark.parametrize("tail", [b'{"prompt_id": "p1", "pro', b'{"prompt_id": "p1"}garbage\n',
                                  b"\xff\xfe\n"])
def test_resume_cuts_a_torn_last_line(tmp_path, tail):
    from valuenet import rollouts
    from valuenet.data import ROWS, append_rollouts, read_rollouts

    rollouts.save_manifest(tmp_path, _manifest())
    append_rollouts(tmp_path, [_row("p0", 0), _row("p0", 1)])
    with (tmp_path / ROWS).open("ab") as f:
        f.write(tail)  # a crash in the middle of the next prompt's append
    done = rollouts.prepare_folder(tmp_path, _manifest())
    assert done == {"p0"}
    append_rollouts(tmp_path, [_row("p1", 0), _row("p1", 1)])  # resuming appends cleanly
    _, rows = read_rollouts(tmp_path)
    assert [(r.prompt_id, r.sample) for r in rows] == [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)]


def test_a_whole_rows_file_is_left_alone(tmp_path):
    from valuenet import rollouts
    from valuenet.data import ROWS, append_rollouts

    append_rollouts(tmp_path, [_row("p0", 0)])
    before = (tmp_path / ROWS).read_bytes()
    assert rollouts.repair_torn_tail(tmp_path) == 0
    assert (tmp_path / ROWS).read_bytes() == before
    assert rollouts.repair_torn_tail(tmp_path / "absent") == 0


def test_a_long_torn_line_is_found_across_chunks(tmp_path):
    from valuenet import rollouts
    from valuenet.data import ROWS

    good = json.dumps({"prompt_id": "p0"}).encode() + b"\n"
    (tmp_path / ROWS).write_bytes(good + b'{"x": "' + b"y" * 200_000)
    assert rollouts.repair_torn_tail(tmp_path) == 200_007
    assert (tmp_path / ROWS).read_bytes() == good
