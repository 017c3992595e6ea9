"""Which pipeline class runs a folder: diffusers writes its own class into model_index.json (`_class_name`).

    pipe, params = sdjax.load_pipeline("stabilityai/stable-diffusion-xl-base-1.0", dtype=jnp.bfloat16)  # auto.py
    type(pipe)   # FlaxStableDiffusionXLPipeline
    refiner, rparams = sdjax.load_pipeline(path, task="img2img")   # the image-to-image class of the family

Every `from_pretrained` checks the family too: an SDXL folder given to `FlaxStableDiffusionPipeline` (or the
other way round) is refused with a message that names the class to use.
"""

from __future__ import annotations

from ..errors import ConfigError

#: diffusers' class (model_index.json `_class_name`, without a legacy "Flax" prefix) -> the sdjax class that runs it
PIPELINES = {
    "StableDiffusionPipeline": "FlaxStableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline": "FlaxStableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "FlaxStableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline": "FlaxStableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline": "FlaxStableDiffusionXLImg2ImgPipeline",
}
#: what each family runs, by task
TASKS = {
    "sd": {"text2img": "FlaxStableDiffusionPipeline", "img2img": "FlaxStableDiffusionImg2ImgPipeline",
           "inpaint": "FlaxStableDiffusionInpaintPipeline", "merge": "FlaxStableDiffusionMergePipeline"},
    "sdxl": {"text2img": "FlaxStableDiffusionXLPipeline", "img2img": "FlaxStableDiffusionXLImg2ImgPipeline"},
}


def class_name(index: dict) -> str:
    """model_index.json's `_class_name` without the "Flax" prefix of old diffusers Flax folders ("" if absent)."""
    name = index.get("_class_name")
    return name.removeprefix("Flax") if isinstance(name, str) else ""


def family(index: dict) -> str:
    """"sdxl" for the StableDiffusionXL* pipelines (two text encoders, micro-conditioning), else "sd"."""
    return "sdxl" if class_name(index).startswith("StableDiffusionXL") else "sd"


def _family_of_class(cls) -> str:
    return getattr(cls, "family", "sd")


def check_pipeline_class(index: dict, index_path, cls) -> None:
    """Refuse a folder of the other family, naming the class (and the loader) that runs it."""
    folder_family = family(index)
    if folder_family == _family_of_class(cls):
        return
    name = class_name(index)
    same_task = next((task for task, c in TASKS[_family_of_class(cls)].items() if c == cls.__name__), "text2img")
    suggestion = TASKS[folder_family].get(same_task)
    if suggestion is None:
        raise ConfigError(f"{index_path}: this is a {name} folder; sdjax's {cls.__name__} runs Stable Diffusion "
                          f"1.x/2.x folders, and {same_task} is not implemented for the {folder_family.upper()} "
                          f"family (it has: {', '.join(TASKS[folder_family].values())})")
    raise ConfigError(f"{index_path}: this is a {name or 'Stable Diffusion'} folder, which {cls.__name__} does not "
                      f"run: load it with sdjax.{suggestion}.from_pretrained, or sdjax.load_pipeline(path), which "
                      "picks the class from model_index.json")


def pipeline_class_name(index: dict, index_path, task: str | None = None) -> str:
    """The name of the sdjax class for a folder: its own (`_class_name`), or its family's class for `task`."""
    if task is not None:
        fam = family(index)
        if task not in TASKS["sd"]:
            raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS['sd'])}")
        if task not in TASKS[fam]:
            raise ConfigError(f"{index_path}: {task} is not implemented for {class_name(index)} folders "
                              f"(sdjax runs them with: {', '.join(TASKS[fam].values())})")
        return TASKS[fam][task]
    name = class_name(index)
    if name and name not in PIPELINES:
        raise ConfigError(f"{index_path}: _class_name {index.get('_class_name')!r} is not a pipeline sdjax runs "
                          f"(it runs: {', '.join(PIPELINES)})")
    return PIPELINES.get(name, "FlaxStableDiffusionPipeline")
