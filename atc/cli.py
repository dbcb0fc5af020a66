"""What every command-line script shares: the error type for bad flags and the wrapper that turns it into one
clear line instead of a traceback.

    from atc.cli import ConfigError, run_cli

    def main(args):
        if args.epochs < 0:
            raise ConfigError(f"--epochs must be >= 0, got {args.epochs}.")
        ...

    if __name__ == "__main__":
        sys.exit(run_cli(main, get_args_parser()))
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence

from atc.errors import CLI_ERRORS, ConfigError

__all__ = ["ConfigError", "run_cli", "parse_model_kwargs"]


def parse_model_kwargs(items: Sequence[str] | None) -> dict[str, Any]:
    """``["embed_dim=64", "depth=4"]`` -> ``{"embed_dim": 64, "depth": 4}`` (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--model-kwargs expects key=value pairs, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_cli(main: Callable[[Any], Any], parser: Any, argv: list[str] | None = None) -> int:
    """Parse ``argv`` with ``parser``, run ``main(args)``; a :class:`ConfigError`, a dataset error or a checkpoint
    error becomes one ``error: ...`` line on stderr and exit code 2 instead of a traceback."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except CLI_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
