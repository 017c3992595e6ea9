"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class SdjaxError(Exception):
    """Base class: a problem with the user's input, files or environment, with a message that says what."""


class ConfigError(SdjaxError, ValueError):
    """A config key has a value sdjax does not support (the message names the key and the supported values)."""


class WeightsError(SdjaxError):
    """A weights file is missing, unreadable, refused (pickle), or does not match the model."""
