"""Files shipped with sdjax: the trained toy LDM (`toy-shapes/`), the offline default model."""

from pathlib import Path

from ..errors import SdjaxError

TOY_MODEL = Path(__file__).parent / "toy-shapes"


def toy_model_path() -> Path:
    if not (TOY_MODEL / "model_index.json").is_file():
        raise SdjaxError(f"the shipped toy model is missing from {TOY_MODEL}; reinstall sdjax, or pass --model")
    return TOY_MODEL
