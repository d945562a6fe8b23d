"""The registry's one error, in a module of its own: the registry (scorers.py) and the composite
scorers it builds (ensemble.py) both raise it, and neither imports the other for it."""


class UnknownScorer(ValueError):
    """The request named a scorer that does not exist or cannot be loaded."""
