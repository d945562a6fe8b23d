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
