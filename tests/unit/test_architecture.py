"""Package rules (docs/ARCHITECTURE.md), read from the source with ast: who may import whom.

- decoding/ is pure: no vllm, no fastapi, no other project package;
- vllm is imported only by the runtime's engine-side modules (the engine wrapper, the
  logits processor it loads into its worker, and vLLM's tool-call schema and parsers);
- the offline packages (valuenet, finetune, evaluation, dual, bench) and runtime never import
  server: the server sits on top of runtime, not under the tools;
- value-head inference (heads/: the scorer, the in-engine tilt) sits below runtime: it imports no
  project package but decoding, and runtime imports no offline tool (valuenet, finetune, ...);
- the command line (cli/) sits above everything and nothing imports it; server imports no
  offline tool; no module loads a project module by name (importlib), so every arrow is seen;
- no import cycles among project modules, deferred (in-function) imports included;
- every package has an `__init__` docstring saying what it owns.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = {"cli", "server", "runtime", "decoding", "heads", "valuenet", "finetune", "evaluation",
           "dual"}
OFFLINE = ("valuenet", "finetune", "evaluation", "dual", "bench")
VLLM_MODULES = {"runtime/engine.py", "runtime/cdq_plugin.py", "runtime/tools.py"}


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "results" not in p.parts)


def imports(path: Path) -> set[str]:
    """Dotted names `path` imports, anywhere in it; relative imports resolved to its package."""
    rel = path.relative_to(ROOT)
    package = ".".join(rel.parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(rel))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.add(f"{base}.{node.module}" if node.module else base)
            else:
                out.add(node.module or "")
    return out


def top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def offenders(packages, forbidden: set[str]) -> list[str]:
    return [f"{p.relative_to(ROOT)} imports {sorted(top(imports(p)) & forbidden)}"
            for pkg in packages for p in modules(pkg) if top(imports(p)) & forbidden]


def test_decoding_is_pure():
    assert offenders(["decoding"], {"vllm", "fastapi", "starlette"} | PROJECT - {"decoding"}) == []


def test_only_engine_side_modules_import_vllm():
    found = {str(p.relative_to(ROOT)) for pkg in [*PROJECT, "bench"] for p in modules(pkg)
             if "vllm" in top(imports(p))}
    # bench_bon's raw vLLM peer is the measured comparison, not alignserve's engine
    assert found - {"bench/bench_bon.py"} <= VLLM_MODULES


def test_offline_packages_and_runtime_never_import_server():
    assert offenders([*OFFLINE, "runtime"], {"server"}) == []


def test_the_command_line_sits_above_everything():
    assert offenders([*(PROJECT - {"cli"}), "bench"], {"cli"}) == []


def test_server_never_imports_an_offline_tool():
    assert offenders(["server"], set(OFFLINE)) == []


def loads_by_name(path: Path) -> list[str]:
    """Calls that import a module named by a string (importlib.import_module, __import__):
    what they load is no arrow the rules can check."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.split(".")[-1] in ("import_module", "__import__"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return found


def test_no_project_module_is_loaded_by_name():
    assert [hit for pkg in [*PROJECT, "bench"] for p in modules(pkg)
            for hit in loads_by_name(p)] == []


def test_value_head_inference_sits_below_runtime():
    assert offenders(["heads"], PROJECT - {"heads", "decoding"}) == []


def test_runtime_never_imports_an_offline_tool():
    assert offenders(["runtime"], set(OFFLINE)) == []


@pytest.mark.parametrize("package", sorted(PROJECT))
def test_every_package_says_what_it_owns(package):
    init = ROOT / package / "__init__.py"
    assert init.is_file(), f"{package}/ has no __init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.split()) >= 10, f"{package}/__init__.py needs a docstring"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def project_imports(path: Path, known: set[str], lazy: bool = True) -> set[str]:
    """Project modules `path` imports: at module level, and inside functions unless `lazy` is
    false (an import deferred into a function still ties the two modules together); never
    under `if TYPE_CHECKING:` (annotations only). `from pkg import mod` imports pkg.mod only."""
    rel = path.relative_to(ROOT)
    package = ".".join(rel.parts[:-1])
    out: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if not lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module or ""
                subs = {f"{mod}.{alias.name}" for alias in node.names} & known
                # `from . import render` loads render, not more of the package it sits in
                out.update(subs if len(subs) == len(node.names) else subs | {mod})
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text(), str(rel)).body)
    return out & known


def import_cycles(lazy: bool = True) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), sorted."""
    paths = {module_name(p): p for pkg in PROJECT for p in modules(pkg)}
    known = set(paths)
    graph = {m: project_imports(p, known, lazy) - {m} for m, p in paths.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(cycles)


def test_the_cycle_finder_sees_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "loop"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("from loop import a\n\n\ndef f():\n    from . import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\n\nimport loop.b\n"
                              "if TYPE_CHECKING:\n    from .d import D\n")
    (pkg / "d.py").write_text("from . import c\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PROJECT", {"loop"})
    assert import_cycles(lazy=False) == [["loop.a", "loop.b"]]  # b -> c: inside a function
    assert import_cycles() == [["loop.a", "loop.b", "loop.c"]]  # c -> d: annotations only


def test_no_import_cycles_among_project_modules():
    """Not at load time (a half-initialised module), nor through a function's deferred import:
    a library never reaches back into the command that uses it."""
    assert import_cycles() == []


def test_the_engine_seam_is_layered():
    """decoding's seam reads bottom-up: the data that crosses it (types.py) and what an engine
    raises (errors.py) import no project module; the protocols only the data; a decoding job
    (request.py) only those; the behaviour strategies use (context.py: DecodeContext) on top."""
    known = {module_name(p) for pkg in PROJECT for p in modules(pkg)}
    allowed = {"types": set(), "errors": set(), "protocols": {"types"},
               "request": {"types", "protocols"},
               "context": {"types", "protocols", "request"}}
    found = {name: {m.removeprefix("decoding.")
                    for m in project_imports(ROOT / "decoding" / f"{name}.py", known)}
             for name in allowed}
    assert {name: found[name] - ok for name, ok in allowed.items()} == {n: set() for n in allowed}


def test_server_policy_and_observability_sit_below_the_request_path():
    """server/policy/ (hot-swap) and server/observability/ (request ids, tracing, metrics) are
    used by the routes and the serving path, never the other way round; every HTTP route is an
    APIRouter in server/routes/, so the policy manager holds no routes of its own."""
    known = {module_name(p) for pkg in PROJECT for p in modules(pkg)}
    above = ("server.routes", "server.serving", "server.app")
    found = [f"{p.relative_to(ROOT)} imports {m}" for sub in ("policy", "observability")
             for p in sorted((ROOT / "server" / sub).glob("*.py"))
             for m in sorted(project_imports(p, known)) if m.startswith(above)]
    assert found == []
    routers = [str(p.relative_to(ROOT)) for p in modules("server")
               if "APIRouter(" in p.read_text() and p.parent.name != "routes"]
    assert routers == []
