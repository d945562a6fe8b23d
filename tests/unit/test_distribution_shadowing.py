"""scripts/check_shadowing.py (issue 30, `make lint`): alignserve's top-level package names
(server, runtime, ...) resolve to this checkout and no other distribution provides them."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_shadowing.py"
_spec = importlib.util.spec_from_file_location("check_shadowing", SCRIPT)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def run_script(extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def fake_dist(site: Path, name: str, record: list[str], top_level: str | None = None,
              meta: str = "dist-info") -> md.Distribution:
    info = site / f"{name}-1.0.{meta}"
    info.mkdir(parents=True)
    (info / ("METADATA" if meta == "dist-info" else "PKG-INFO")).write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in record))
    if top_level is not None:
        (info / "top_level.txt").write_text(top_level)
    return md.PathDistribution(info)


def test_this_environment_has_no_shadowing():
    proc = run_script()
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "server" in proc.stdout


def test_a_folder_earlier_on_sys_path_is_reported(tmp_path):
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "__init__.py").write_text("")
    proc = run_script(tmp_path)
    assert proc.returncode == 1
    assert f"server: shadowed, resolves to {tmp_path / 'server' / '__init__.py'}" in proc.stderr
    assert "runtime:" not in proc.stderr  # only the clashing name


def test_an_installed_rival_distribution_is_reported(tmp_path):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "__init__.py").write_text("")
    fake_dist(tmp_path, "rival", ["runtime/__init__.py", "rival-1.0.dist-info/METADATA"])
    proc = run_script(tmp_path)
    assert proc.returncode == 1
    assert "runtime: also provided by the distribution rival 1.0" in proc.stderr
    assert "runtime: shadowed" in proc.stderr


def test_provided_names_read_record_and_top_level(tmp_path):
    dist = fake_dist(tmp_path, "many", [
        "pkg/__init__.py", "pkg/__pycache__/x.cpython-311.pyc", "mod.py", "ext.cpython-311-x86_64.so",
        "nsportion/sub/a.py", "many-1.0.dist-info/RECORD", "many-1.0.data/scripts/tool",
        "../../../bin/many", "__pycache__/mod.cpython-311.pyc", "helper.pth", "README.txt",
    ], top_level="legacy\npkg\n")
    assert check.provided_names(dist) == {"pkg", "mod", "ext", "nsportion", "legacy"}


def test_rivals_skip_the_project_and_unrelated_names(tmp_path):
    ours = fake_dist(tmp_path / "a", "alignserve", ["server/__init__.py"])
    egg = fake_dist(tmp_path / "b", "old-tool", [], top_level="decoding\n", meta="egg-info")
    other = fake_dist(tmp_path / "c", "fine", ["fine/__init__.py", "tests/__init__.py"])
    problems = check.rival_distributions(["server", "decoding", "runtime"], [ours, egg, other])
    assert len(problems) == 1 and problems[0].startswith(
        "decoding: also provided by the distribution old-tool 1.0")


def test_project_packages_are_root_folders_with_an_init(tmp_path):
    for folder, init in [("server", True), ("docs", False), ("heads", True), (".hidden", True)]:
        (tmp_path / folder).mkdir()
        if init:
            (tmp_path / folder / "__init__.py").write_text("")
    assert check.project_packages(tmp_path) == ["heads", "server"]
    assert {"server", "runtime", "decoding"} <= set(check.project_packages())


@pytest.mark.parametrize(("spec", "installed", "expect"), [
    (None, set(), "not importable"),
    (SimpleNamespace(origin=None, submodule_search_locations=["/x/server"]), set(), "namespace"),
    (SimpleNamespace(origin="/elsewhere/server/__init__.py"), set(), "shadowed"),
    (SimpleNamespace(origin="/site/server/__init__.py"), {Path("/site/server/__init__.py")}, None),
    (SimpleNamespace(origin=str(ROOT / "server" / "__init__.py")), set(), None),
])
def test_resolution_accepts_the_checkout_or_the_installed_files(spec, installed, expect):
    problems = check.resolution_problems(["server"], ROOT, lambda name: spec, installed)
    if expect is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expect in problems[0]
