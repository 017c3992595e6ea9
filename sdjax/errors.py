"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""

import sys


class SdjaxError(Exception):
    """Base class: a problem with the user's input, files or environment, with a message that says what."""


class ConfigError(SdjaxError, ValueError):
    """A config key has a value sdjax does not support (the message names the key and the supported values)."""


class WeightsError(SdjaxError):
    """A weights file is missing, unreadable, refused (pickle), or does not match the model."""


def exit_code(command, prog: str) -> int:
    """Run `command()` for a command-line program: 0 when it returns; an SdjaxError is printed as one line,
    `prog: error: ...` (exit code 2), and Ctrl-C as `prog: interrupted` (130). `sdjax` and `train.*` use it."""
    try:
        command()
    except SdjaxError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
