"""`load_pipeline`: the pipeline class a folder's model_index.json names (`loading.pipeline_class_name`)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import open_pipeline_folder
from .image_to_image import FlaxStableDiffusionImg2ImgPipeline, FlaxStableDiffusionMergePipeline
from .inpaint import FlaxStableDiffusionInpaintPipeline
from .loading import pipeline_class_name
from .stable_diffusion import FlaxStableDiffusionPipeline
from .stable_diffusion_xl import FlaxStableDiffusionXLImg2ImgPipeline, FlaxStableDiffusionXLPipeline

CLASSES = {cls.__name__: cls for cls in (
    FlaxStableDiffusionPipeline, FlaxStableDiffusionImg2ImgPipeline, FlaxStableDiffusionInpaintPipeline,
    FlaxStableDiffusionMergePipeline, FlaxStableDiffusionXLPipeline, FlaxStableDiffusionXLImg2ImgPipeline)}


def pipeline_class(pretrained_model_name_or_path, task: str | None = None, revision: str | None = None):
    """The sdjax class that runs a folder or hub repo id (only its model_index.json is read or fetched):
    the class of its `_class_name`, or with `task` ("text2img", "img2img", "inpaint", "merge") its family's class."""
    root, index = open_pipeline_folder(pretrained_model_name_or_path, ["model_index.json"], revision=revision)
    return CLASSES[pipeline_class_name(index, root / "model_index.json", task)]


def load_pipeline(pretrained_model_name_or_path, task: str | None = None, revision: str | None = None, **kwargs):
    """(pipeline, params) of a diffusers folder or hub repo id, with the class its model_index.json names:

        pipe, params = load_pipeline(path)                    # StableDiffusionXLPipeline -> FlaxStableDiffusionXLPipeline
        refiner, p2 = load_pipeline(path, task="img2img")     # the family's image-to-image class

    kwargs go to that class's `from_pretrained` (dtype, scheduler, param_dtype, attention_kernel, ...)."""
    cls = pipeline_class(pretrained_model_name_or_path, task, revision)
    return cls.from_pretrained(pretrained_model_name_or_path, revision=revision, **kwargs)


def pipeline_for(pipe, task: str):
    """The class of `pipe`'s family for `task` ("text2img", "img2img", ...), to rebuild it with `from_pipe` (the same
    modules and params): an SDXL pipeline gets the SDXL classes; a task its family lacks is a ConfigError."""
    from .loading import TASKS

    fam = getattr(pipe, "family", "sd")
    name = TASKS[fam].get(task)
    if name is None:
        raise ConfigError(f"{task} is not implemented for {fam.upper()} pipelines (sdjax runs them with: "
                          f"{', '.join(TASKS[fam].values())})")
    return CLASSES[name]
