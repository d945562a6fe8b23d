"""The KV block size setting: flag/env, bounds, and the per-device default (no engine)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runtime.engine import CPU_BLOCK_SIZE, resolve_block_size
from runtime.settings import EngineSettings


def test_default_is_measured_on_cpu_and_vllms_own_on_gpu():
    assert EngineSettings().block_size is None
    assert resolve_block_size(None, cuda=False) == CPU_BLOCK_SIZE
    assert CPU_BLOCK_SIZE in (32, 64)  # the two sizes bench/bench_block_size.py chooses from
    assert resolve_block_size(None, cuda=True) is None  # left unset: vLLM's default


@pytest.mark.parametrize("cuda", [False, True])
def test_an_explicit_block_size_wins_on_every_device(cuda):
    assert resolve_block_size(128, cuda=cuda) == 128


def test_env_and_flag(monkeypatch):
    import argparse

    from cli.serve import _add_settings_flags, settings_from_args

    monkeypatch.setenv("ALIGNSERVE_BLOCK_SIZE", "32")
    assert EngineSettings().block_size == 32
    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    assert settings_from_args(parser.parse_args(["--block-size", "128"])).block_size == 128


@pytest.mark.parametrize("bad", [0, 8, 48 + 1, 2048])
def test_bounds(bad):
    with pytest.raises(ValidationError):
        EngineSettings(block_size=bad)


def test_bench_reads_the_prefix_cache_hit_rate_from_metrics_text():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    snap = lambda h, q: (  # noqa: E731 - vLLM's exposition: counters get `_total`
        "# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.\n"
        "# TYPE vllm:prefix_cache_hits counter\n"
        f'vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {h}\n'
        f'vllm:prefix_cache_hits_created{{engine="0",model_name="m"}} 1.7e9\n'
        f'vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {q}\n'
        "alignserve:requests_total 3.0\n")
    assert common.prefix_cache_counts(snap(10.0, 40.0)) == (10.0, 40.0)
    assert common.prefix_cache_hit_rate(snap(10.0, 40.0), snap(40.0, 100.0)) == 0.5
    assert common.prefix_cache_hit_rate(snap(1.0, 2.0), snap(1.0, 2.0)) is None
