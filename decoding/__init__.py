"""decoding: the alignment algorithms, pure and engine-agnostic.

Owns the `Engine` and `Scorer` protocols, the strategy registry (none, best_of_n, soft_best_of_n, speculative_rejection)
and KL accounting. Imports neither fastapi nor vllm: every algorithm here runs against fakes in
unit tests and against the vLLM engine wrapper in `server/engine.py` in production.
"""

from . import speculative_rejection, strategies  # noqa: F401  (fill the STRATEGIES registry)
