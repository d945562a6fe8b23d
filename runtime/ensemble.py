"""Reward ensembles and calibrated rewards: scorers built from other scorers by name.

Spelling (resolved by `ScorerRegistry.get` / `load_now`, so a request, `alignserve eval`,
`rollouts`, `dual` and BOND accept them wherever they accept a scorer name):

- `ensemble:A,B,C`                 mean of the members' calibrated scores
- `ensemble[median]:A,B,C`         median;  `ensemble[min]:A,B` worst case (Coste et al. 2024, WCO)
- `ensemble[mean_minus_std=K]:A,B` mean − K·std over members (uncertainty-weighted, after
                                   Coste et al. 2024's UWO; K ≥ 0, default 1)
- `calibrated:NAME`                one member: its calibrated score alone
- a member spelled `-NAME` counts −score (a cost as a utility: `ensemble:relevance,-profanity`)

Members are any scorers the registry resolves (built-ins, `hf:`, `remote:`, `value:` heads),
each through the registry's own `get`, so whatever the registry refuses for a request it
refuses as a member too. Ensembles do not nest (a member may not be `ensemble:`/`calibrated:`).

Calibration (decoding/calibration.py): each member's scores are replaced, per call, by their
leave-one-out quantiles among the candidates scored together (the fraction of the other
candidates beaten, ties ½; InfAlign's calibrated reward, Balashankar et al. 2025), then
aggregated. The scores are therefore *relative* to the candidates of one call (`relative` is
True): meaningful where a strategy scores its i.i.d. candidates in one call and compares
scores only within it (best_of_n, soft_best_of_n, nash: their `Traits.relative_scores_ok`).
Each `get` builds a new ensemble object (they are cheap: the members are the registry's cached
scorers), so the cross-request score batcher, which keys on the scorer object, never mixes
two requests' candidates into one calibration.

Members are scored concurrently (one thread per member for each call: torch, sklearn and HTTP
calls release the GIL). A failing member fails the call: its exception propagates, named —
`UpstreamUnavailable` (remote members) keeps its status and code with the member's name in
the message; any other exception gets a note naming the member. No member is ever dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from decoding.calibration import AGGREGATIONS, aggregate, loo_quantiles
from decoding.protocols import Scorer

from .remote_scorer import UpstreamUnavailable
from .scorer_errors import UnknownScorer

MAX_MEMBERS = 8
_ENSEMBLE = re.compile(r"^ensemble(?:\[(?P<agg>[a-z_]+)(?:=(?P<k>[^\]]*))?\])?:(?P<members>.*)$")
_PREFIXES = ("ensemble:", "ensemble[", "calibrated:")


def is_composite(name: str) -> bool:
    """A name this module resolves (`ensemble...:` or `calibrated:`)."""
    return name.startswith(_PREFIXES)


@dataclass(frozen=True)
class Spec:
    """A parsed ensemble name."""

    name: str  # canonical spelling
    aggregation: str
    k: float
    members: tuple[str, ...]  # as spelled, a leading "-" included

    @property
    def member_names(self) -> list[str]:
        """The registry names to load (signs stripped)."""
        return [m.removeprefix("-") for m in self.members]


def parse(name: str) -> Spec:
    """`Spec` of an `ensemble...:` / `calibrated:` name; UnknownScorer (a 400 on the server)
    saying what is wrong otherwise."""
    if name.startswith("calibrated:"):
        members, agg, k = [name[len("calibrated:"):].strip()], "mean", 1.0
        if not members[0] or "," in members[0]:
            raise UnknownScorer(f"{_show(name)}: calibrated:NAME takes one scorer name "
                                "(several: ensemble:A,B)")
    else:
        m = _ENSEMBLE.match(name)
        if m is None:
            raise UnknownScorer(f"{_show(name)}: spell an ensemble ensemble:A,B or "
                                f"ensemble[AGG]:A,B with AGG one of {', '.join(AGGREGATIONS)} "
                                "(mean_minus_std=K takes K)")
        agg, k = m["agg"] or "mean", _k(name, m["agg"], m["k"])
        members = [x.strip() for x in m["members"].split(",")]
        if len(members) < 2 or len(members) > MAX_MEMBERS:
            raise UnknownScorer(f"{_show(name)}: an ensemble takes 2 to {MAX_MEMBERS} members "
                                "(one alone: calibrated:NAME)")
    for member in members:
        bare = member.removeprefix("-")
        if not bare or bare.startswith("-"):
            raise UnknownScorer(f"{_show(name)}: empty or malformed member {member!r}")
        if is_composite(bare):
            raise UnknownScorer(f"{_show(name)}: ensembles do not nest (member {member!r}); "
                                "members are calibrated already")
    if len({x.removeprefix("-") for x in members}) < len(members):
        raise UnknownScorer(f"{_show(name)}: a member appears twice")
    canonical = name if name.startswith("calibrated:") else (
        "ensemble" + ("" if agg == "mean" else f"[{agg}" + (f"={k:g}]" if agg ==
                      "mean_minus_std" else "]")) + ":" + ",".join(members))
    return Spec(canonical, agg, k, tuple(members))


def _show(name: str) -> str:
    """The name for an error message, cut short (it is the client's own input)."""
    return repr(name if len(name) <= 120 else name[:120] + "…")


def _k(name: str, agg: str | None, raw: str | None) -> float:
    if agg is not None and agg not in AGGREGATIONS:
        raise UnknownScorer(f"{_show(name)}: unknown aggregation {agg!r}; one of "
                            f"{', '.join(AGGREGATIONS)}")
    if raw is None:
        return 1.0
    if agg != "mean_minus_std":
        raise UnknownScorer(f"{_show(name)}: only mean_minus_std takes a parameter")
    try:
        k = float(raw)
    except ValueError:
        k = math.nan
    if not (math.isfinite(k) and 0.0 <= k <= 100.0):
        raise UnknownScorer(f"{_show(name)}: K in mean_minus_std=K must be a number in [0, 100]")
    return k


@dataclass(frozen=True)
class Member:
    label: str  # as spelled, "-profanity" for a negated one
    scorer: Scorer
    sign: float  # +1, or −1 for "-NAME"


class EnsembleScorer:
    """A text scorer combining its members' calibrated scores (module docstring)."""

    relative = True  # scores are relative to the candidates of one call

    def __init__(self, spec: Spec, scorers: Sequence[Scorer]) -> None:
        self.name = spec.name
        self.aggregation, self.k = spec.aggregation, spec.k
        self.members = [Member(label, s, -1.0 if label.startswith("-") else 1.0)
                        for label, s in zip(spec.members, scorers, strict=True)]

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        return self.combine(self.utilities(prompt, responses))

    def utilities(self, prompt: str, responses: Sequence[str]) -> list[list[float]]:
        """Each member's signed raw scores (rows = members), members scored concurrently."""
        return self._each(lambda s: s.score(prompt, responses), len(responses))

    def combine(self, utilities: Sequence[Sequence[float]]) -> list[float]:
        """Calibrate each member's row among the candidates, then aggregate."""
        return aggregate([loo_quantiles(row) for row in utilities], self.aggregation, self.k)

    def _each(self, call: Callable[[Any], Sequence[float]], count: int) -> list[list[float]]:
        if len(self.members) == 1:
            return [self._one(self.members[0], call, count)]
        with ThreadPoolExecutor(len(self.members), thread_name_prefix="ensemble") as pool:
            futures = [pool.submit(self._one, m, call, count) for m in self.members]
        # every member has finished (the pool's exit waits); the first failure in member
        # order is raised, so which member is named does not depend on timing
        return [f.result() for f in futures]

    @staticmethod
    def _one(member: Member, call: Callable[[Any], Sequence[float]], count: int) -> list[float]:
        try:
            values = [float(v) for v in call(member.scorer)]
        except UpstreamUnavailable as exc:
            raise UpstreamUnavailable(exc.status, f"ensemble member {member.label}: "
                                      f"{exc.message}", exc.code) from exc
        except Exception as exc:
            exc.add_note(f"raised by ensemble member {member.label}")
            raise
        if len(values) != count:
            raise RuntimeError(f"ensemble member {member.label} returned {len(values)} scores "
                               f"for {count}")
        if any(math.isnan(v) for v in values):
            raise RuntimeError(f"ensemble member {member.label} returned NaN")
        return [member.sign * v for v in values]


class TokenEnsembleScorer(EnsembleScorer):
    """An ensemble whose members all read token ids (value heads): scores partial answers on
    the exact ids the policy sampled (`decoding.protocols.TokenScorer`)."""

    def score_ids(self, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]]
                  ) -> list[float]:
        return self.combine(self.utilities_ids(prompt_ids, responses))

    def utilities_ids(self, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]]
                      ) -> list[list[float]]:
        return self._each(lambda s: s.score_ids(prompt_ids, responses), len(responses))


def build(spec: Spec, scorers: Sequence[Scorer]) -> EnsembleScorer:
    """The ensemble over loaded members: token ids when every member reads them, else text
    (value heads then use their approximate text path, heads/scorer.py)."""
    if all(hasattr(s, "score_ids") for s in scorers):
        return TokenEnsembleScorer(spec, scorers)
    return EnsembleScorer(spec, scorers)


def load(name: str, load_member: Callable[[str], Scorer]) -> EnsembleScorer:
    """Resolve `name` with the registry's synchronous loader (offline tools)."""
    spec = parse(name)
    return build(spec, [_member(spec, i, m, load_member)
                        for i, m in enumerate(spec.member_names)])


async def get(name: str, get_member: Callable[[str], Awaitable[Scorer]]) -> EnsembleScorer:
    """Resolve `name` with the registry's `get` (the server's request path)."""
    spec = parse(name)
    scorers = []
    for i, m in enumerate(spec.member_names):  # in order: the first bad member is reported
        try:
            scorers.append(await get_member(m))
        except UnknownScorer as exc:
            raise _bad_member(spec, i, exc) from exc
    return build(spec, scorers)


def _member(spec: Spec, i: int, m: str, load_member: Callable[[str], Scorer]) -> Scorer:
    try:
        return load_member(m)
    except UnknownScorer as exc:
        raise _bad_member(spec, i, exc) from exc


def _bad_member(spec: Spec, i: int, exc: UnknownScorer) -> UnknownScorer:
    # by position: the member's own error says as much of its name as the registry allows
    # (a sealed registry does not echo names, which may be paths)
    return UnknownScorer(f"ensemble member {i + 1} of {len(spec.members)}: {exc}")
