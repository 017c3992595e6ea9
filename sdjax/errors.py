"""Errors a user can act on. The CLI prints their message as one line (no traceback) and exits with 2;
the Python API raises them. Any other exception is a bug in sdjax."""


class SdjaxError(Exception):
    """Base class: a problem with the user's input, files or environment, with a message that says what."""


class ConfigError(SdjaxError, ValueError):
    """A config key or an argument has a value sdjax does not support (the message names it and what is expected)."""


class WeightsError(SdjaxError):
    """A weights file is missing, unreadable, refused (pickle), or does not match the model."""


class InputError(SdjaxError, ValueError):
    """An argument of a pipeline call has the wrong type, shape or value (the message names it and what is expected)."""


class NonFiniteError(SdjaxError, FloatingPointError):
    """A generation produced NaN or inf (the message names the first step whose latents were not finite)."""


class AdapterError(WeightsError):
    """A LoRA or textual-inversion file is refused (pickle, unknown layout) or does not fit the model it is loaded
    into (the message names the file, the keys, the layers and both shapes)."""
