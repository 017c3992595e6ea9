"""Files shipped with sdjax: the trained toy LDM (`toy-shapes/`), the offline default model, and its silhouette
ControlNet (`toy-shapes-controlnet/`, a diffusers ControlNet folder: `sdjax train controlnet`)."""

from pathlib import Path

from ..errors import SdjaxError

TOY_MODEL = Path(__file__).parent / "toy-shapes"
TOY_CONTROLNET = Path(__file__).parent / "toy-shapes-controlnet"


def toy_model_path() -> Path:
    if not (TOY_MODEL / "model_index.json").is_file():
        raise SdjaxError(f"the shipped toy model is missing from {TOY_MODEL}; reinstall sdjax, or pass --model")
    return TOY_MODEL


def toy_controlnet_path() -> Path:
    if not (TOY_CONTROLNET / "config.json").is_file():
        raise SdjaxError(f"the shipped toy ControlNet is missing from {TOY_CONTROLNET}; reinstall sdjax, or pass "
                         "--controlnet")
    return TOY_CONTROLNET
