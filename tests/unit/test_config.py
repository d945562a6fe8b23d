"""Start-up configuration: vLLM engine arguments (typed fields and the `--engine-arg`
pass-through), unknown ALIGNSERVE_* variables, one-line configuration errors, and the CLI help."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

import cli.main
import cli.serve
from runtime.engine_args import (
    MANAGED_KEYS,
    TYPED_ENGINE_FIELDS,
    check_engine_args,
    engine_kwargs,
    parse_engine_args,
)
from server.settings import ConfigError, Settings, unknown_env_vars

ROOT = Path(__file__).resolve().parents[2]
# A stand-in for AsyncEngineArgs' fields (the real set needs a vllm import: see
# test_engine_arg_names_cover_the_typed_fields, which is skipped without vllm).
KNOWN = {"swap_space", "max_logprobs", "override_generation_config", "disable_log_stats",
         "cpu_offload_gb", *TYPED_ENGINE_FIELDS, *MANAGED_KEYS}


def test_engine_arg_values_are_json_literals_or_strings():
    args = parse_engine_args('max_logprobs=5,disable-log-stats=true,'
                             'override_generation_config={"temperature": 0.6, "top_k": [1, 2]},'
                             'swap_space=1.5,tokenizer_mode=mistral')
    assert args == {"max_logprobs": 5, "disable_log_stats": True, "swap_space": 1.5,
                    "override_generation_config": {"temperature": 0.6, "top_k": [1, 2]},
                    "tokenizer_mode": "mistral"}
    assert parse_engine_args('{"max_logprobs": 3}') == {"max_logprobs": 3}
    assert parse_engine_args("") == {}


@pytest.mark.parametrize("spec, fragment", [
    ("novalue", "expected KEY=VALUE"),
    ("a=1,a=2", "given twice"),
    ("Bad Key=1", "not an engine argument name"),
    ("{not json", "not a JSON object"),
])
def test_engine_arg_format_errors(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_engine_args(spec)
    with pytest.raises(ValidationError):  # found when the settings load, before anything else
        Settings(engine_args=spec)


def test_unknown_and_managed_engine_args_are_refused_by_name():
    with pytest.raises(ValueError, match="'max_logprob' is not a vLLM engine argument.*"
                                         "max_logprobs"):
        check_engine_args({"max_logprob": 1}, KNOWN)
    with pytest.raises(ValueError, match="'tensor_parallel_size' is set by alignserve; use "
                                         "--tensor-parallel-size"):
        check_engine_args({"tensor_parallel_size": 2}, KNOWN)
    with pytest.raises(ValueError, match="logprobs_mode"):
        check_engine_args({"logprobs_mode": "raw_logprobs"}, KNOWN)
    assert check_engine_args({"max_logprobs": 3}, KNOWN) == {"max_logprobs": 3}


def test_typed_fields_and_pass_through_reach_the_engine_kwargs():
    s = Settings(tensor_parallel_size=4, pipeline_parallel_size=2,
                 distributed_executor_backend="ray", quantization="fp8", max_num_seqs=128,
                 max_num_batched_tokens=8192, kv_cache_dtype="fp8", enforce_eager=True,
                 trust_remote_code=True, engine_args="max_logprobs=5")
    kw = engine_kwargs(s, KNOWN)
    assert kw == {"tensor_parallel_size": 4, "pipeline_parallel_size": 2,
                  "distributed_executor_backend": "ray", "quantization": "fp8",
                  "max_num_seqs": 128, "max_num_batched_tokens": 8192, "kv_cache_dtype": "fp8",
                  "enforce_eager": True, "trust_remote_code": True, "max_logprobs": 5}
    # Unset optional fields are left to vLLM's defaults (not passed as None).
    assert "quantization" not in engine_kwargs(Settings(), KNOWN)
    with pytest.raises(ValidationError):
        Settings(distributed_executor_backend="slurm")


def test_engine_arg_names_cover_the_typed_fields():
    pytest.importorskip("vllm")
    from runtime.engine import engine_arg_names

    names = engine_arg_names()
    assert set(TYPED_ENGINE_FIELDS) <= names
    assert {k for k in MANAGED_KEYS if k != "logprobs_mode"} <= names | {"logprobs_mode"}


def test_build_runtime_refuses_a_bad_engine_arg_before_the_engine(monkeypatch):
    import runtime.engine
    from runtime.startup import build_runtime

    def no_engine(*a, **k):
        raise AssertionError("the engine must not start")

    monkeypatch.setattr(runtime.engine, "engine_arg_names", lambda: frozenset(KNOWN))
    monkeypatch.setattr(runtime.engine, "VllmEngine", no_engine)
    with pytest.raises(ConfigError) as info:
        build_runtime(Settings(model=str(ROOT), engine_args="bogus=1"))
    assert info.value.setting == "engine_args" and "'bogus'" in str(info.value)
    with pytest.raises(ConfigError, match="no such folder"):
        build_runtime(Settings(model="/no/such/model/folder"))


def test_unknown_alignserve_variables_stop_start_up(monkeypatch):
    monkeypatch.setenv("ALIGNSERVE_TENSOR_PARALEL_SIZE", "2")
    monkeypatch.setenv("ALIGNSERVE_PORT", "8001")  # a real one: fine
    assert unknown_env_vars() == ["ALIGNSERVE_TENSOR_PARALEL_SIZE"]
    with pytest.raises(ValidationError, match="ALIGNSERVE_TENSOR_PARALEL_SIZE"):
        Settings()
    monkeypatch.delenv("ALIGNSERVE_TENSOR_PARALEL_SIZE")
    with pytest.raises(ValidationError, match="Extra inputs"):
        Settings(tensor_paralel_size=2)


@pytest.mark.parametrize("argv, env, fragment", [
    (["serve", "--admin-key", "short-secret"], {},
     "invalid setting admin_key (--admin-key, ALIGNSERVE_ADMIN_KEY): must be at least 16"),
    (["serve", "--port", "70000"], {}, "invalid setting port (--port, ALIGNSERVE_PORT)"),
    (["serve"], {"ALIGNSERVE_MAX_TOKEN": "5"}, "unknown environment variable(s) "
     "ALIGNSERVE_MAX_TOKEN"),
    (["serve", "--engine-arg", "x"], {}, "invalid setting engine_args (--engine-arg, "
     "ALIGNSERVE_ENGINE_ARGS): 'x': expected KEY=VALUE"),
    (["serve", "--distributed-executor-backend", "slurm"], {}, "invalid choice: 'slurm'"),
])
def test_configuration_errors_are_one_line_and_exit_2(argv, env, fragment, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        rc = cli.main.main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and fragment in err, err
    assert "short-secret" not in err and "Traceback" not in err


def test_config_error_line_for_start_up_errors():
    line = cli.serve.config_error_line(ConfigError("value_heads", "value head 'a': cannot load /x"))
    assert line == ("alignserve: invalid setting value_heads (--value-head, "
                    "ALIGNSERVE_VALUE_HEADS): value head 'a': cannot load /x")


def test_help_speaks_to_users(capsys):
    with pytest.raises(SystemExit):
        cli.main.main(["--help"])
    out = capsys.readouterr().out
    assert "OpenAI-compatible server" in out and "alignserve serve" in out
    assert "COMMANDS" not in out and "Settings" not in out  # no developer docstring
    for command in ("serve", "rollouts", "eval", "finetune", "train-value", "dual"):
        assert command in out


def test_every_serve_flag_has_a_help_line_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in Settings.model_fields:
        flag = cli.serve.flag_of(name)
        assert flag in out, flag
        assert f"ALIGNSERVE_{name.upper()}" in out
    assert out.count("default ") >= len(Settings.model_fields)


def test_alignserve_serve_with_a_bad_setting_exits_2_in_one_line():
    # The real console script, as users run it: it must fail before any engine work.
    exe = Path(sys.executable).parent / "alignserve"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cli"]
    t0 = time.monotonic()
    p = subprocess.run([*cmd, "serve", "--admin-key", "too-short"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "alignserve: invalid setting admin_key (--admin-key, ALIGNSERVE_ADMIN_KEY): must be at "
        "least 16 characters long"]
    assert p.stdout == "" and time.monotonic() - t0 < 60
