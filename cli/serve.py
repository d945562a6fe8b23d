"""`alignserve serve`: its flags derive from the server's `Settings` (one flag and one
ALIGNSERVE_* variable per field), then the engine starts and uvicorn serves `build_app`.

Configuration errors (a setting pydantic rejects, an unknown ALIGNSERVE_* variable, a bad path
or engine argument found before the engine starts) print one line naming the setting and exit
2: operators read the line, not a traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import typing

import uvicorn
from pydantic import ValidationError

from server.app import build_app
from server.auth import KeyRing, check_open
from server.lifecycle import POST_DRAIN_GRACE_S, DrainingServer
from server.observability.request_ids import configure_logging
from server.presets import parse_preset_flags
from server.settings import ConfigError, Settings

HELP = "Serve the OpenAI-compatible API."
DESCRIPTION = ("Serve the OpenAI-compatible API. Every flag is also an environment variable "
               "(ALIGNSERVE_<FLAG>); flags win.")

# Settings fields whose flag is repeatable: (flag, metavar); the values are joined with commas.
_REPEATABLE = {"value_heads": ("--value-head", "NAME=PATH"),
               "engine_args": ("--engine-arg", "KEY=VALUE"),
               "remote_scorers": ("--remote-scorer", "NAME=URL"),
               "presets": ("--preset", "NAME=JSON"),
               "scorers": ("--scorer", "NAME")}


def flag_of(name: str) -> str:
    return _REPEATABLE[name][0] if name in _REPEATABLE else f"--{name.replace('_', '-')}"


def _default_text(info) -> str:
    if info.default is None:
        return "unset"
    return str(info.default).lower() if isinstance(info.default, bool) else str(info.default)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(Settings)
    for name, info in Settings.model_fields.items():
        kind = hints[name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        env = f"env ALIGNSERVE_{name.upper()}"
        if name in _REPEATABLE:
            flag, metavar = _REPEATABLE[name]
            parser.add_argument(flag, dest=name, action="append", default=None, metavar=metavar,
                                help=f"{info.description} ({env}, comma-separated; default "
                                f"{_default_text(info)})")
            continue
        extra: dict = {"type": base if base in (int, float) else str}
        if base is bool:
            extra["metavar"] = "{true,false}"
            # `--no-NAME` (e.g. --no-playground): the same setting, false
            parser.add_argument(f"--no-{name.replace('_', '-')}", dest=name,
                                action="store_const", const="false", default=None,
                                help=f"Same as {flag_of(name)} false.")
        elif typing.get_origin(base) is typing.Literal:
            extra["choices"] = list(typing.get_args(base))
        parser.add_argument(flag_of(name), dest=name, default=None,
                            help=f"{info.description} ({env}, default {_default_text(info)})",
                            **extra)


def settings_from_args(ns: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(ns).items() if k in Settings.model_fields and v is not None}
    for name in _REPEATABLE.keys() & given.keys():
        # a preset's JSON holds commas: its flags become one mapping, not a joined string
        given[name] = (parse_preset_flags(given[name]) if name == "presets"
                       else ",".join(given[name]))
    return Settings(**given)


def config_error_line(exc: Exception) -> str:
    """One line for a configuration error, naming the setting (its flag and variable)."""
    def where(name: str) -> str:
        if name not in Settings.model_fields:
            return name
        return f"{name} ({flag_of(name)}, ALIGNSERVE_{name.upper()})"

    if isinstance(exc, ConfigError):
        return f"alignserve: invalid setting {where(exc.setting)}: {exc.message}"
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            msg = err.get("msg", "invalid value").removeprefix("Value error, ")
            ctx = err.get("ctx") or {}
            if err.get("type") == "extra_forbidden":
                msg = "no such setting"
            elif err.get("type") in ("too_short", "too_long") and "min_length" in ctx:
                msg = f"must be at least {ctx['min_length']} characters long"  # secrets: no echo
            elif err.get("type") == "too_long" and "max_length" in ctx:
                msg = f"must be at most {ctx['max_length']} characters long"
            parts.append(f"invalid setting {where(loc)}: {msg}" if loc else msg)
        return "alignserve: " + "; ".join(parts).replace("\n", " ")
    return f"alignserve: {exc}".replace("\n", " ")


async def _serve(settings: Settings) -> None:
    from runtime.startup import open_runtime  # torch and vllm: `serve` only, not the parser's path

    try:  # a bad key configuration, or an open API by accident, fails before the engine loads
        check_open(KeyRing.from_settings(settings), settings)
    except (ValueError, OSError) as exc:
        setting = "api_keys_file" if isinstance(exc, OSError) else "api_keys"
        raise ConfigError(setting, str(exc)) from None
    tracer = _tracer(settings)  # before the engine: a missing exporter fails in a second
    # inside the loop: AsyncLLM binds to the running loop; the engine stops however it ends
    async with open_runtime(settings) as runtime:
        app = build_app(settings, runtime, tracer=tracer)
        await app.state.serving.resolver.presets.check(runtime)  # names known? one line, exit 2
        # The drain (SIGTERM) waits for in-flight requests itself; afterwards uvicorn only
        # flushes finished responses.
        config = uvicorn.Config(app, host=settings.host, port=settings.port,
                                log_level=settings.log_level.lower(),
                                access_log=False,  # ours has the request id (request_ids.py)
                                log_config=None,  # keep the root handler configure_logging set
                                timeout_graceful_shutdown=int(POST_DRAIN_GRACE_S))
        await DrainingServer(config, app.state.lifecycle, settings.drain_timeout_s).serve()
        logging.getLogger(__name__).info("stopping the engine")
    logging.getLogger(__name__).info("engine stopped")
    if tracer is not None:
        tracer.shutdown()  # flush the last spans


def _tracer(settings: Settings):
    """OpenTelemetry spans to `otlp_traces_endpoint` (server/observability/tracing.py); None
    when unset."""
    if not settings.otlp_traces_endpoint:
        return None
    from server.observability.tracing import Tracing

    try:
        return Tracing.to_endpoint(settings.otlp_traces_endpoint)
    except ImportError as exc:
        raise ConfigError("otlp_traces_endpoint", f"tracing needs the opentelemetry-sdk and "
                          f"opentelemetry-exporter-otlp packages ({exc})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    _add_settings_flags(parser)


def run(ns: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(ns)
    except (ValidationError, ConfigError) as exc:
        print(config_error_line(exc), file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)  # request ids on every line
    try:
        asyncio.run(_serve(settings))
    except ConfigError as exc:
        print(config_error_line(exc), file=sys.stderr)
        return 2
    return 0
