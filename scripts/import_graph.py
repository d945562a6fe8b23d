"""Print the import graph between the project's packages: one `A -> B (n)` line per edge, n the
number of modules of A that import B (at module level or inside a function), read with ast.

    python scripts/import_graph.py [ROOT]
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("cli", "server", "runtime", "decoding", "heads", "valuenet", "finetune", "evaluation",
            "dual", "bench")


def imported(root: Path, rel: Path) -> set[str]:
    """Top-level names of every module `rel` imports (relative imports: its own package)."""
    own = rel.parts[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse((root / rel).read_text(), str(rel))):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.add(own if node.level else (node.module or "").split(".")[0])
    return out


def graph(root: Path) -> dict[tuple[str, str], int]:
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            if "results" in rel.parts:
                continue
            names = imported(root, rel)
            if pkg == "bench":  # the benchmarks import their shared module as `common`
                names.discard("common")
            for other in sorted(names & set(PACKAGES) - {pkg}):
                edges[pkg, other] += 1
    return dict(edges)


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    for (a, b), n in sorted(graph(root).items()):
        print(f"{a} -> {b} ({n})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
