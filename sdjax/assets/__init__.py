"""Files shipped with sdjax: the trained toy LDM (`toy-shapes/`), the offline default model, and the noise-conditional
classifier trained on its latents for classifier guidance (`toy-shapes-classifier/`)."""

from pathlib import Path

from ..errors import SdjaxError

TOY_MODEL = Path(__file__).parent / "toy-shapes"
TOY_CLASSIFIER = Path(__file__).parent / "toy-shapes-classifier"


def toy_model_path() -> Path:
    if not (TOY_MODEL / "model_index.json").is_file():
        raise SdjaxError(f"the shipped toy model is missing from {TOY_MODEL}; reinstall sdjax, or pass --model")
    return TOY_MODEL


def toy_classifier_path() -> Path:
    if not (TOY_CLASSIFIER / "config.json").is_file():
        raise SdjaxError(f"the shipped toy classifier is missing from {TOY_CLASSIFIER}; reinstall sdjax, or pass "
                         "--classifier")
    return TOY_CLASSIFIER
