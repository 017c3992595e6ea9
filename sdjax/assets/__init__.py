"""Files shipped with sdjax: the trained toy LDM (`toy-shapes/`), the offline default model, and its silhouette
ControlNet (`toy-shapes-controlnet/`, a diffusers ControlNet folder: `sdjax train controlnet`). The toy cascade's
second stage (`toy-shapes-upscaler/`, 32x32 -> 64x64) has its place here but is not shipped yet (docs/cascade.md). The noise-conditional
classifier trained on its latents for classifier guidance (`toy-shapes-classifier/`)."""

from pathlib import Path

from ..errors import SdjaxError

TOY_MODEL = Path(__file__).parent / "toy-shapes"
TOY_CLASSIFIER = Path(__file__).parent / "toy-shapes-classifier"
TOY_CONTROLNET = Path(__file__).parent / "toy-shapes-controlnet"
TOY_UPSCALER = Path(__file__).parent / "toy-shapes-upscaler"

#: how the toy cascade runs its upscaler by default (--cascade, or sdjax upscale without --model); to be chosen by
#: `sdjax train evaluate --cascade --noise-level ...` once a toy upscaler is trained (docs/cascade.md)
TOY_UPSCALER_SETTINGS = {"steps": 25, "guidance": 1.0, "noise_level": 100}


def toy_model_path() -> Path:
    if not (TOY_MODEL / "model_index.json").is_file():
        raise SdjaxError(f"the shipped toy model is missing from {TOY_MODEL}; reinstall sdjax, or pass --model")
    return TOY_MODEL


def toy_controlnet_path() -> Path:
    if not (TOY_CONTROLNET / "config.json").is_file():
        raise SdjaxError(f"the shipped toy ControlNet is missing from {TOY_CONTROLNET}; reinstall sdjax, or pass "
                         "--controlnet")
    return TOY_CONTROLNET


def toy_upscaler_path() -> Path:
    if not (TOY_UPSCALER / "model_index.json").is_file():
        raise SdjaxError(f"no toy upscaler in {TOY_UPSCALER}: this sdjax ships none yet (docs/cascade.md: how to "
                         "train one, and why it is not shipped); pass an upscaler folder instead (--upscaler PATH, "
                         "--model PATH for sdjax upscale)")
    return TOY_UPSCALER


def toy_classifier_path() -> Path:
    if not (TOY_CLASSIFIER / "config.json").is_file():
        raise SdjaxError(f"the shipped toy classifier is missing from {TOY_CLASSIFIER}; reinstall sdjax, or pass "
                         "--classifier")
    return TOY_CLASSIFIER
