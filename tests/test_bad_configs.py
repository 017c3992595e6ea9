"""Property-style checks of config validation: every field of every model config, given a value of the wrong
type (generated from the field's declared type, not hand-listed), is refused with an error naming the key."""

import json

import pytest

from sdjax.errors import ConfigError, WeightsError
from sdjax.models.autoencoder_kl import AutoencoderKL
from sdjax.models.clip_text import CLIPTextModel
from sdjax.models.controlnet import ControlNetModel
from sdjax.models.unet_2d_condition import UNet2DConditionModel
from sdjax.validation import wrong_values

MODELS = [UNet2DConditionModel, AutoencoderKL, CLIPTextModel, ControlNetModel]


def cases():
    for cls in MODELS:
        hints = cls.config_types()
        for key in cls.config_fields():
            for bad in wrong_values(hints[key]):
                yield pytest.param(cls, key, bad, id=f"{cls.__name__}.{key}={json.dumps(bad)}")


@pytest.mark.parametrize("cls,key,bad", list(cases()))
def test_wrong_type_is_a_clear_error(cls, key, bad):
    with pytest.raises(ConfigError) as e:
        cls.from_config({key: bad}, source="some/config.json")
    msg = str(e.value)
    assert f"'{key}'" in msg and "expected" in msg and "some/config.json" in msg, msg
    assert "\n" not in msg


def test_every_model_field_is_covered():
    n = sum(1 for _ in cases())
    fields = sum(len(cls.config_fields()) for cls in MODELS)
    assert n >= 2 * fields - 20, "wrong_values() generates at least two wrong values for nearly every field"


@pytest.mark.parametrize("cls,key,value", [
    (AutoencoderKL, "scaling_factor", 0), (AutoencoderKL, "scaling_factor", -0.5),
    (AutoencoderKL, "block_out_channels", [32, 0]), (UNet2DConditionModel, "layers_per_block", 0),
    (UNet2DConditionModel, "attention_head_dim", [8, -1, 8, 8]), (CLIPTextModel, "num_hidden_layers", 0),
    (ControlNetModel, "conditioning_embedding_out_channels", [16, 0]), (ControlNetModel, "conditioning_channels", 0),
])
def test_numbers_that_must_be_positive(cls, key, value):
    with pytest.raises(ConfigError, match=f"'{key}' = .*must be > 0"):
        cls.from_config({key: value})


def test_config_file_errors_name_the_file(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    for text, match in (("{", "config.json is not valid JSON"), ("[1, 2]", "expected a JSON object"),
                        ('{"block_out_channels": null}', r"'block_out_channels' = None .*config.json.*list of int"),
                        ('{"scaling_factor": "0.18"}', r"'scaling_factor' = '0.18' .*expected number, got string")):
        (folder / "config.json").write_text(text)
        with pytest.raises((ConfigError, WeightsError), match=match):
            AutoencoderKL.from_pretrained(folder)
