"""Check that nothing else in this environment shadows alignserve's top-level packages.

alignserve installs top-level packages named after its folders (server, runtime, decoding, ...):
the design's layout, meant for its own environment or image. A name like `server` is easy to
collide with, and Python resolves a clash silently: a `server/` earlier on sys.path (another
distribution's, or a stray folder) wins, and `alignserve serve` runs someone else's code or fails
on a missing attribute. Two checks, for every folder at the repository root with an __init__.py:

1. `importlib.util.find_spec(name)` resolves to this checkout (an editable install) or to the
   files of the installed alignserve distribution: the name is importable and not shadowed. An
   editable install made before a package existed does not know it: reinstall (`make install`).
2. no other installed distribution provides the same top-level name (its top_level.txt, or its
   RECORD's first path components): two owners of one name overwrite or hide each other's files.

The repository root is taken off sys.path first: the check is about what an installed
`alignserve` sees, not what a Python started in the checkout happens to find. Standard library
only, a second or so: `make lint` runs it. Exit 1 with one line per problem.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "alignserve"
# RECORD entries that name no importable top-level: metadata folders, data and headers
_NOT_A_PACKAGE = re.compile(r"\.(dist-info|egg-info|data)$|^__pycache__$|^\.\.$|\.pth$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_packages(root: Path = ROOT) -> list[str]:
    """The top-level packages of the checkout: folders at the root holding an __init__.py."""
    return sorted(p.parent.name for p in root.glob("*/__init__.py")
                  if not p.parent.name.startswith("."))


def provided_names(dist: md.Distribution) -> set[str]:
    """Top-level import names a distribution installs: top_level.txt where it has one, plus the
    first component of every file it records (a package folder, a module, an extension)."""
    names = set((dist.read_text("top_level.txt") or "").split())
    for f in dist.files or []:
        head = f.parts[0] if f.parts else ""
        if not head or _NOT_A_PACKAGE.search(head):
            continue
        if len(f.parts) > 1:
            names.add(head)  # a folder: a package, or a namespace portion of one
        elif head.endswith((".py", ".so", ".pyd")):
            names.add(head.split(".")[0])  # a module, or an extension module (name.cpython-*.so)
    return {n.replace("/", ".").split(".")[0] for n in names}


def rival_distributions(packages: Iterable[str], dists: Iterable[md.Distribution],
                        project: str = PROJECT) -> list[str]:
    """One line per (distribution, name) where a distribution other than the project provides
    one of its package names."""
    ours = set(packages)
    problems = []
    for dist in dists:
        name = dist.metadata["Name"] or "?"
        if canonical(name) == canonical(project):
            continue
        for clash in sorted(provided_names(dist) & ours):
            problems.append(f"{clash}: also provided by the distribution {name} "
                            f"{dist.version} ({getattr(dist, '_path', '?')})")
    return problems


def project_files(project: str = PROJECT) -> set[Path]:
    """Absolute paths of the files every installed copy of the project records."""
    files: set[Path] = set()
    for dist in md.distributions():
        if canonical(dist.metadata["Name"] or "") == canonical(project):
            files.update(Path(str(f.locate())).resolve() for f in dist.files or [])
    return files


def resolution_problems(packages: Iterable[str], root: Path,
                        find_spec: Callable[[str], object],
                        installed: set[Path]) -> list[str]:
    """One line per package that does not import from this checkout or the installed project."""
    problems = []
    for name in packages:
        spec = find_spec(name)
        origin = getattr(spec, "origin", None)
        if spec is None:
            problems.append(f"{name}: not importable in this environment (install alignserve: "
                            "`make install`; an older editable install does not know new packages)")
        elif origin is None:
            locations = list(getattr(spec, "submodule_search_locations", None) or [])
            problems.append(f"{name}: resolves to a namespace package {locations}, not to "
                            f"{root / name}/__init__.py")
        elif not (Path(origin).resolve().is_relative_to(root.resolve())
                  or Path(origin).resolve() in installed):
            problems.append(f"{name}: shadowed, resolves to {origin}")
    return problems


def _without_checkout(root: Path) -> None:
    """Take the checkout (and the working directory, when it is the checkout) off sys.path."""
    here = root.resolve()
    sys.path[:] = [p for p in sys.path
                   if Path(os.path.abspath(p or os.getcwd())).resolve() != here]


def main() -> int:
    _without_checkout(ROOT)
    packages = project_packages(ROOT)
    problems = resolution_problems(packages, ROOT, importlib.util.find_spec, project_files())
    dists = list(md.distributions())
    problems += rival_distributions(packages, dists)
    for line in problems:
        print(f"check_shadowing: {line}", file=sys.stderr)
    if not problems:
        print(f"check_shadowing: ok, {len(packages)} packages ({', '.join(packages)}) against "
              f"{len(dists)} installed distributions")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
