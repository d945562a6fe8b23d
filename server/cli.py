"""`alignserve` command line. `serve` flags derive from `Settings`; every other command lives
with its package and is listed in `COMMANDS` (module with `add_arguments(parser)` and
`run(namespace) -> int`; such modules import heavy libraries only inside `run`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import importlib
import typing

from .settings import Settings

# name -> (module, help). The module is imported when the parser is built: keep its top light.
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("evaluation.cli", "Evaluate strategies on a prompt set."),
    "rollouts": ("valuenet.rollouts",
                 "Sample K responses per prompt from the reference policy and score them."),
    "dual": ("finetune.dual_cli", "Solve CAN's dual for the optimal safety weight λ* from rollouts."),
    "finetune": ("finetune.cli", "Fine-tune a policy with SafeDPO or MoCAN."),
    "train-value": ("valuenet.cli", "Train a prefix value head (CD-FUDGE or CD-Q) on rollouts."),
}

# Settings fields whose flag is repeatable: flag name; the values are joined with commas.
_REPEATABLE = {"value_heads": "--value-head"}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(Settings)
    for name, info in Settings.model_fields.items():
        kind = hints[name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        if name in _REPEATABLE:
            parser.add_argument(_REPEATABLE[name], dest=name, action="append", default=None,
                                metavar="NAME=PATH", help=f"{info.description} (env "
                                f"ALIGNSERVE_{name.upper()}, comma-separated)")
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                            type=base if base in (int, float) else str,
                            help=f"{info.description} (env ALIGNSERVE_{name.upper()}, "
                                 f"default {info.default})")


def settings_from_args(ns: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(ns).items() if k in Settings.model_fields and v is not None}
    for name in _REPEATABLE.keys() & given.keys():
        given[name] = ",".join(given[name])
    return Settings(**given)


async def _serve(settings: Settings) -> None:
    import uvicorn

    from .app import build_app
    from .auth import KeyRing
    from .lifecycle import POST_DRAIN_GRACE_S, DrainingServer
    from .runtime import build_runtime

    KeyRing.from_settings(settings)  # a bad key configuration fails before the engine loads
    runtime = build_runtime(settings)  # inside the loop: AsyncLLM binds to the running loop
    try:
        app = build_app(settings, runtime)
        # The drain (SIGTERM) waits for in-flight requests itself; afterwards uvicorn only
        # flushes finished responses.
        config = uvicorn.Config(app, host=settings.host, port=settings.port,
                                log_level=settings.log_level.lower(),
                                access_log=False,  # ours has the request id (tracing.py)
                                log_config=None,  # keep the root handler configure_logging set
                                timeout_graceful_shutdown=int(POST_DRAIN_GRACE_S))
        await DrainingServer(config, app.state.lifecycle, settings.drain_timeout_s).serve()
    finally:
        logging.getLogger(__name__).info("stopping the engine")
        runtime.engine.shutdown()
        logging.getLogger(__name__).info("engine stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Serve the OpenAI-compatible API.")
    _add_settings_flags(serve)
    prep = sub.add_parser("prepare-model", help="Convert the embedded SmolLM2 GGUF to safetensors.")
    prep.add_argument("--home", default=None, help="Cache folder (default ALIGNSERVE_HOME).")
    prep.add_argument("--force", action="store_true", help="Convert again even if present.")
    for name, (module, help_) in COMMANDS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_))
    ns = parser.parse_args(argv)
    settings = settings_from_args(ns)
    from .tracing import configure_logging

    configure_logging(settings.log_level, settings.log_format)  # request ids on every line
    if ns.command == "prepare-model":
        from .model_prep import prepare_embedded_model

        print(prepare_embedded_model(settings.home, force=ns.force))
        return 0
    if ns.command in COMMANDS:
        return importlib.import_module(COMMANDS[ns.command][0]).run(ns)
    asyncio.run(_serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
