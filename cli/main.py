"""The `alignserve` parser: one subcommand per entry of `COMMANDS`, each a module with
`add_arguments(parser)` and `run(namespace) -> int` (and `HELP` where it lives here).

`serve` reads the server's `Settings` (cli/serve.py); an offline command reads only what it
needs: its own flags, the engine's settings when it has engine flags (runtime/settings.py,
checked here so that a bad value is one line and exit 2 as for `serve`), and how to log."""

from __future__ import annotations

import argparse
import sys
import typing
from types import ModuleType

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from dual import cli as dual_cli
from evaluation import cli as eval_cli
from finetune import cli as finetune_cli
from runtime.settings import ENGINE_FLAGS, ConfigError, engine_settings
from server.observability.request_ids import configure_logging
from server.settings import Settings
from valuenet import cli as train_value_cli
from valuenet import rollouts_cli

from . import prepare_model, serve

DESCRIPTION = """\
alignserve: an OpenAI-compatible server (/v1/chat/completions, /v1/completions) that answers
with inference-time alignment (best-of-n, speculative rejection, controlled decoding) on vLLM.

Start with `alignserve serve` (flags: `alignserve serve --help`; every flag is also an
ALIGNSERVE_* environment variable). The other commands are the offline jobs: rollouts and
value heads for controlled decoding, CAN's dual, SafeDPO/MoCAN fine-tuning, evaluation."""

# name -> (module, help). Every module is imported to build the parser: keep their tops light.
COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "serve": (serve, serve.HELP),
    "prepare-model": (prepare_model, prepare_model.HELP),
    "eval": (eval_cli, "Evaluate strategies on a prompt set."),
    "rollouts": (rollouts_cli,
                 "Sample K responses per prompt from the reference policy and score them."),
    "dual": (dual_cli, "Solve CAN's dual for the optimal safety weight λ* from rollouts."),
    "finetune": (finetune_cli, "Fine-tune a policy (SafeDPO, MoCAN, KLDO, PRO, BOND) "
                 "or train an Aligner corrector."),
    "train-value": (train_value_cli,
                    "Train a prefix value head (CD-FUDGE or CD-Q) on rollouts."),
}


class LogSettings(BaseSettings):
    """What an offline command reads of the server's environment: how to log, the same two
    fields (and ALIGNSERVE_* variables) as `serve`'s."""

    model_config = SettingsConfigDict(env_prefix="ALIGNSERVE_", extra="ignore",
                                      hide_input_in_errors=True)

    log_level: str = Settings.model_fields["log_level"]
    log_format: typing.Literal["text", "json"] = Settings.model_fields["log_format"]


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line too (argparse prints the whole usage block otherwise)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignserve", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_))
    return parser


def _offline_setup(ns: argparse.Namespace) -> None:
    """Logging as `serve` logs, and the engine flags checked before any work starts."""
    logs = LogSettings()
    if any(getattr(ns, name, None) is not None for name in ENGINE_FLAGS):
        engine_settings(ns)  # the command builds its own; a bad value fails here, in one line
    configure_logging(logs.log_level, logs.log_format)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command != "serve":
        try:
            _offline_setup(ns)
        except (ValidationError, ConfigError) as exc:
            print(serve.config_error_line(exc), file=sys.stderr)
            return 2
    return COMMANDS[ns.command][0].run(ns)


if __name__ == "__main__":
    sys.exit(main())
