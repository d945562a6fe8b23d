"""Guards around a policy hot-swap (server/policy/manager.py): which folders the admin API may load
from, and the canary generation that checks new weights before any request runs on them.

`policy_root`: a checkpoint or adapter path given to `/admin/policies` must resolve (symlinks
followed, `os.path.realpath`) to a folder inside it, and so must every file read from it
(server/policy/checkpoints.py checks the shards and the files it opens). A path outside the root
and a path that does not exist get the same answer, which names neither, so the admin API cannot
be used to probe the server's file system. Unset, the root is the folder that holds the served
model (in deploy/: the model volume); when the served model is not a local folder either, the
admin API loads no paths at all. Paths in the policy file (operator configuration, like CLI
flags) are not confined.

Canary: after `reload_weights`, a few greedy tokens of a fixed prompt must come back, with
finite log-probs, and more likely than uniform (zeroed weights give every token exactly
log 1/V). A checkpoint that loads but produces garbage is rolled back before the gate reopens.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from decoding.types import Sampling

from .checkpoints import NOT_FOUND, CheckpointError, check_inside

CANARY_PROMPT = "The capital of France is"
CANARY_TOKENS = 4


class CanaryFailed(Exception):
    pass


def default_root(model_path: str | None) -> Path | None:
    """The folder holding the served model, when that is a local folder; else None."""
    if not model_path:
        return None
    folder = Path(model_path).expanduser()
    return Path(os.path.realpath(folder)).parent if folder.is_dir() else None


def confine(path: str, root: Path | None) -> str:
    """The resolved folder for an admin-given `path`; CheckpointError (one generic message)
    when it is outside `root` or does not exist; when there is no root at all, a refusal."""
    if root is None:
        raise CheckpointError("loading checkpoints through the admin API is disabled on this "
                              "server: set policy_root", "policy_root_unset")
    check_inside(Path(path).expanduser(), root)
    if not Path(path).expanduser().exists():
        raise CheckpointError(NOT_FOUND, "path_not_found")
    return os.path.realpath(Path(path).expanduser())


async def canary(engine) -> None:
    """A few greedy tokens from the weights just loaded; CanaryFailed when they are not sane."""
    tok = engine.tokenizer
    ids = tok.encode(CANARY_PROMPT, add_special_tokens=False) or [0]
    samples = await engine.generate(ids, 1, Sampling(max_tokens=CANARY_TOKENS, temperature=0.0,
                                                     ignore_eos=True))
    if not samples or not samples[0].token_ids:
        raise CanaryFailed("the new weights generated no tokens")
    lps = samples[0].logprobs
    if len(lps) != len(samples[0].token_ids) or not all(math.isfinite(x) for x in lps):
        raise CanaryFailed("the new weights gave non-finite log-probabilities")
    uniform = -math.log(max(2, len(tok)))
    if sum(lps) / len(lps) <= uniform + 1e-3:
        raise CanaryFailed("the new weights' next-token distribution is flat (no better than "
                           "uniform: zeroed or broken weights)")
