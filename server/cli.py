"""`alignserve` command line. `serve` flags derive from `Settings`; every other command lives
with its package and is listed in `COMMANDS` (module with `add_arguments(parser)` and
`run(namespace) -> int`; such modules import heavy libraries only inside `run`).

Configuration errors (a setting pydantic rejects, an unknown ALIGNSERVE_* variable, a bad path
or engine argument found before the engine starts) print one line naming the setting and exit
2: operators read the line, not a traceback."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
import typing

import uvicorn
from pydantic import ValidationError

from runtime.model_prep import prepare_embedded_model

from .app import build_app
from .auth import KeyRing, check_open
from .lifecycle import POST_DRAIN_GRACE_S, DrainingServer
from .presets import parse_preset_flags
from .settings import ConfigError, Settings
from .tracing import configure_logging

DESCRIPTION = """\
alignserve: an OpenAI-compatible server (/v1/chat/completions, /v1/completions) that answers
with inference-time alignment (best-of-n, speculative rejection, controlled decoding) on vLLM.

Start with `alignserve serve` (flags: `alignserve serve --help`; every flag is also an
ALIGNSERVE_* environment variable). The other commands are the offline jobs: rollouts and
value heads for controlled decoding, CAN's dual, SafeDPO/MoCAN fine-tuning, evaluation."""

# name -> (module, help). The module is imported when the parser is built: keep its top light.
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("evaluation.cli", "Evaluate strategies on a prompt set."),
    "rollouts": ("valuenet.rollouts_cli",
                 "Sample K responses per prompt from the reference policy and score them."),
    "dual": ("dual.cli", "Solve CAN's dual for the optimal safety weight λ* from rollouts."),
    "finetune": ("finetune.cli", "Fine-tune a policy (SafeDPO, MoCAN, KLDO, PRO, BOND) "
                 "or train an Aligner corrector."),
    "train-value": ("valuenet.cli", "Train a prefix value head (CD-FUDGE or CD-Q) on rollouts."),
}

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
                                access_log=False,  # ours has the request id (tracing.py)
                                log_config=None,  # keep the root handler configure_logging set
                                timeout_graceful_shutdown=int(POST_DRAIN_GRACE_S))
        await DrainingServer(config, app.state.lifecycle, settings.drain_timeout_s).serve()
        logging.getLogger(__name__).info("stopping the engine")
    logging.getLogger(__name__).info("engine stopped")
    if tracer is not None:
        tracer.shutdown()  # flush the last spans


def _tracer(settings: Settings):
    """OpenTelemetry spans to `otlp_traces_endpoint` (server/otel.py); None when unset."""
    if not settings.otlp_traces_endpoint:
        return None
    from .otel import Tracing

    try:
        return Tracing.to_endpoint(settings.otlp_traces_endpoint)
    except ImportError as exc:
        raise ConfigError("otlp_traces_endpoint", f"tracing needs the opentelemetry-sdk and "
                          f"opentelemetry-exporter-otlp packages ({exc})") from None


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line too (argparse prints the whole usage block otherwise)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="alignserve", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="Serve the OpenAI-compatible API.",
                           description="Serve the OpenAI-compatible API. Every flag is also an "
                           "environment variable (ALIGNSERVE_<FLAG>); flags win.")
    _add_settings_flags(serve)
    prep = sub.add_parser("prepare-model", help="Convert the embedded SmolLM2 GGUF to safetensors.")
    prep.add_argument("--home", default=None, help="Cache folder (default ALIGNSERVE_HOME).")
    prep.add_argument("--force", action="store_true", help="Convert again even if present.")
    for name, (module, help_) in COMMANDS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_))
    ns = parser.parse_args(argv)
    try:
        settings = settings_from_args(ns)
    except (ValidationError, ConfigError) as exc:
        print(config_error_line(exc), file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)  # request ids on every line
    if ns.command == "prepare-model":
        print(prepare_embedded_model(settings.home, force=ns.force))
        return 0
    if ns.command in COMMANDS:
        return importlib.import_module(COMMANDS[ns.command][0]).run(ns)
    try:
        asyncio.run(_serve(settings))
    except ConfigError as exc:
        print(config_error_line(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
