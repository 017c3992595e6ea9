"""Files shipped with sdjax: the trained toy LDM (`toy-shapes/`), the offline default model, and its upscaler
(`toy-shapes-upscaler/`, 32x32 -> 64x64: the toy cascade's second stage)."""

from pathlib import Path

from ..errors import SdjaxError

TOY_MODEL = Path(__file__).parent / "toy-shapes"
TOY_UPSCALER = Path(__file__).parent / "toy-shapes-upscaler"

#: how the toy cascade runs its upscaler by default (chosen by `sdjax train evaluate --cascade`, docs/cascade.md)
TOY_UPSCALER_SETTINGS = {"steps": 25, "guidance": 1.0, "noise_level": 100}


def toy_model_path() -> Path:
    if not (TOY_MODEL / "model_index.json").is_file():
        raise SdjaxError(f"the shipped toy model is missing from {TOY_MODEL}; reinstall sdjax, or pass --model")
    return TOY_MODEL


def toy_upscaler_path() -> Path:
    if not (TOY_UPSCALER / "model_index.json").is_file():
        raise SdjaxError(f"the shipped toy upscaler is missing from {TOY_UPSCALER}; reinstall sdjax, or pass "
                         "--upscaler PATH")
    return TOY_UPSCALER
