"""Headless matplotlib: every report and benchmark plots through `pyplot()`."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display; also safe in worker threads). The
    backend must be chosen before pyplot is first imported, hence the import here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, ax: Any, path: Any, legend_size: float | None = None) -> None:
    """The house finish of a one-axes figure: light grid, legend, tight layout, 110 dpi PNG,
    and the figure closed (reports draw many in one process)."""
    ax.grid(True, alpha=0.3)
    ax.legend(**({"fontsize": legend_size} if legend_size else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
