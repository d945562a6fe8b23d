"""Presets: an `alignment` object served under a model id, so clients that cannot send the
extension (chat frontends, SDK apps used unchanged) pick alignment by choosing a model.

A preset is configured at start-up (`--preset NAME=JSON`, repeatable; `--presets-file PATH`,
YAML or JSON; `ALIGNSERVE_PRESETS` as a JSON object) as either an alignment object
(`{"strategy": "best_of_n", "n": 8}`) or `{"alignment": {...}, "adapter": NAME, "description":
TEXT}` where `adapter` answers with a LoRA adapter of the base model.

How a request's own `alignment` combines with its preset's (`apply`):
- the request names no strategy, or the preset's: field by field, the request's fields win
  (`{"n": 16}` on a best-of-8 preset is best-of-16);
- the request names another strategy (`none` included): the request's object replaces the
  preset's entirely (a field of one strategy means nothing to another).

Schema errors (unknown strategy, option, bad value) are caught when the settings load; unknown
scorers, value heads and adapters once the runtime is up (`check`), both before serving, each
as one line naming the preset and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from decoding.strategies import STRATEGIES
from runtime.settings import ConfigError

from .errors import APIError
from .protocol import Alignment, AlignmentBase

_ALIGNMENT: TypeAdapter[Any] = TypeAdapter(Alignment)
_SPEC_KEYS = {"alignment", "adapter", "description"}
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/+-")


@dataclass(frozen=True)
class Preset:
    name: str
    alignment: dict[str, Any]  # as configured (validated); merged with each request's
    adapter: str | None = None
    description: str | None = None

    @property
    def strategy(self) -> str:
        return self.alignment.get("strategy", "none")


def _error(name: str, field: str, message: str) -> ConfigError:
    return ConfigError("presets", f"preset {name!r}: {field}: {message}")


def parse_preset(name: str, spec: Any) -> Preset:
    """One preset from its spec, schema-checked; ConfigError names the preset and field."""
    if not name or len(name) > 128 or not set(name) <= _NAME_CHARS:
        raise _error(name, "name", "1-128 characters from letters, digits and . _ : / + -")
    if not isinstance(spec, dict):
        raise _error(name, "spec", "expected a JSON object (an alignment object)")
    if "alignment" in spec:
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise _error(name, sorted(unknown)[0], f"unknown key (allowed: {sorted(_SPEC_KEYS)})")
        alignment, adapter, description = spec["alignment"], spec.get("adapter"), spec.get(
            "description")
    else:
        alignment, adapter, description = spec, None, None
    if not isinstance(alignment, dict):
        raise _error(name, "alignment", "expected a JSON object")
    for key, value in (("adapter", adapter), ("description", description)):
        if value is not None and not isinstance(value, str):
            raise _error(name, key, "expected a string")
    try:
        _ALIGNMENT.validate_python(alignment)
    except ValidationError as exc:
        raise _error(name, *_first_error(exc)) from None
    return Preset(name, dict(alignment), adapter, description)


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    if err.get("type") == "unknown_strategy":
        return "alignment.strategy", f"unknown strategy; available: {', '.join(sorted(STRATEGIES))}"
    if len(loc) > 1 and loc[0] in STRATEGIES:
        loc = loc[1:]  # the union member's tag
    loc = [p for p in loc if p.isidentifier() or p.isdigit()]  # not "constrained-float"
    return ".".join(["alignment", *loc]), err.get("msg", "invalid value").removeprefix(
        "Value error, ")


def load_presets_file(path: Path) -> dict[str, Any]:
    """NAME → spec from a YAML or JSON mapping (YAML is a superset of JSON)."""
    import yaml  # a dependency of transformers; imported here to keep the parser light

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError("presets_file", f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("presets_file", f"{path} is not YAML or JSON: "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError("presets_file", f"{path}: expected a mapping of preset name → spec")
    return data


def parse_preset_flags(flags: list[str]) -> dict[str, Any]:
    """`--preset NAME=JSON` values → NAME → spec (the JSON may contain '=' and ',')."""
    out: dict[str, Any] = {}
    for flag in flags:
        name, sep, spec = flag.partition("=")
        if not sep:
            raise ConfigError("presets", f"--preset {flag!r}: expected NAME=JSON")
        try:
            out[name.strip()] = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ConfigError("presets", f"preset {name.strip()!r}: not JSON ({exc.msg})") from None
    return out


class PresetBook:
    """The server's presets, by model id, and the optional default for the base model."""

    def __init__(self, presets: dict[str, Preset], default: str | None, base_model: str) -> None:
        if base_model in presets:
            raise ConfigError("presets", f"preset {base_model!r}: name is the base model's")
        if default is not None and default not in presets:
            raise ConfigError("default_preset", f"{default!r} is not a configured preset "
                              f"(configured: {', '.join(sorted(presets)) or 'none'})")
        self.presets, self.default, self.base_model = presets, default, base_model

    @classmethod
    def from_specs(cls, specs: dict[str, Any], default: str | None,
                   base_model: str) -> PresetBook:
        return cls({name: parse_preset(name, spec) for name, spec in specs.items()},
                   default, base_model)

    def __contains__(self, model: object) -> bool:
        return model in self.presets

    def __iter__(self):
        return iter(self.presets.values())

    def for_request(self, model: str | None, alignment: AlignmentBase | None) -> Preset | None:
        """The preset that applies: the one named by `model`, else the default preset for a
        base-model request without `alignment`."""
        if model is not None and model in self.presets:
            return self.presets[model]
        if self.default is not None and alignment is None and model in (None, self.base_model):
            return self.presets[self.default]
        return None

    async def check(self, runtime) -> None:
        """Every scorer, value head and adapter a preset names exists (start-up, one line)."""
        for p in self.presets.values():
            for key in ("reward", "cost", "value"):
                name = p.alignment.get(key)
                if name is None:
                    continue
                try:
                    await runtime.scorers.get(name)
                except Exception as exc:  # UnknownScorer, or a model that fails to load
                    raise _error(p.name, f"alignment.{key}", str(exc).splitlines()[0]) from None
            if p.adapter is not None and p.adapter not in runtime.adapters:
                raise _error(p.name, "adapter", f"{p.adapter!r} is not a registered LoRA adapter")


def apply(preset: Preset, alignment: AlignmentBase | None) -> AlignmentBase:
    """The preset's alignment with the request's own on top (module docstring: the rules)."""
    if alignment is None:
        return _ALIGNMENT.validate_python(preset.alignment)
    given = alignment.model_dump(exclude_unset=True)
    if "strategy" in given and given["strategy"] != preset.strategy:
        return alignment  # another strategy: the request's object replaces the preset's
    merged = {**preset.alignment, **given}
    try:
        return _ALIGNMENT.validate_python(merged)
    except ValidationError as exc:
        param, message = _first_error(exc)
        raise APIError(400, f"{param}: {message} (alignment merged over preset "
                       f"{preset.name!r})", param=param, code="invalid_value") from None
