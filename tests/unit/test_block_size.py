"""The KV block size setting: flag/env, bounds, and the per-device default (no engine)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.engine import CPU_BLOCK_SIZE, resolve_block_size
from server.settings import Settings


def test_default_is_measured_on_cpu_and_vllms_own_on_gpu():
    assert Settings().block_size is None
    assert resolve_block_size(None, cuda=False) == CPU_BLOCK_SIZE
    assert CPU_BLOCK_SIZE in (32, 64)  # the two sizes bench/bench_block_size.py chooses from
    assert resolve_block_size(None, cuda=True) is None  # left unset: vLLM's default


@pytest.mark.parametrize("cuda", [False, True])
def test_an_explicit_block_size_wins_on_every_device(cuda):
    assert resolve_block_size(128, cuda=cuda) == 128


def test_env_and_flag(monkeypatch):
    import argparse

    from server.cli import _add_settings_flags, settings_from_args

    monkeypatch.setenv("ALIGNSERVE_BLOCK_SIZE", "32")
    assert Settings().block_size == 32
    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    assert settings_from_args(parser.parse_args(["--block-size", "128"])).block_size == 128


@pytest.mark.parametrize("bad", [0, 8, 48 + 1, 2048])
def test_bounds(bad):
    with pytest.raises(ValidationError):
        Settings(block_size=bad)
