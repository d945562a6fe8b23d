"""Seeds for every engine call of one request, pairwise disjoint.

vLLM gives the n children of a request the seeds seed, seed + 1, ..., seed + n − 1, so two calls
whose seeds lie less than n apart share candidates, and the i.i.d. draws the KL bounds rest on
are no longer independent. Every call that a strategy makes on behalf of one request therefore
derives its own seed from (request seed, path), where the path names the call (choice, block,
track, ...): a keyed hash spreads the derived seeds over 62 bits, so two ranges of n children
overlap with probability about n / 2⁶² — never, in practice. Deterministic: the same request
seed gives the same seeds, hence the same answer.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 62  # headroom below 2⁶³ so that seed + child index never overflows an int64


def derive_seed(seed: int | None, *path: int | str) -> int | None:
    """The seed of the call named `path` within a request seeded `seed` (None: unseeded)."""
    if seed is None:
        return None
    key = repr((seed, *path)).encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"alignserve").digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)


def choice_seed(seed: int | None, choice: int, children: int) -> int | None:
    """The seed of OpenAI choice `choice` when each choice's first engine call draws `children`
    samples: seed + choice·children, so the choices' child ranges [s, s + children) are disjoint
    and plain sampling (children = 1) keeps vLLM's own seed + index convention."""
    return None if seed is None else (seed + choice * children) % 2**SEED_BITS


def child_seed(seed: int | None, index: int) -> int | None:
    """The seed vLLM gives child `index` of one call seeded `seed` (seed + index). A strategy
    that runs one call's children as separate engine requests (speculative rejection's tracks)
    seeds them so, and draws exactly the samples that call would: with the same request seed,
    its candidates are best-of-n's, and a comparison of the two is paired (every difference is
    the strategy's, none is sampling noise)."""
    return None if seed is None else seed + index
