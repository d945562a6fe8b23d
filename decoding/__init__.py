"""decoding: the alignment algorithms, pure and engine-agnostic.

Owns the `Engine` and `Scorer` protocols, the strategy registry (none, best_of_n,
soft_best_of_n, speculative_rejection, blockwise_cd, tokenwise_cd, aligner, nash,
particle_filtering), KL accounting and per-call seeds. Imports neither fastapi nor vllm:
every algorithm here runs against fakes in unit tests and against the vLLM engine wrapper in
`runtime/engine.py` in production.
"""

# imported to fill the STRATEGIES registry
from . import (  # noqa: F401
    aligner,
    blockwise_cd,
    nash,
    particle_filtering,
    speculative_rejection,
    strategies,
    tokenwise_cd,
)
