"""`sdjax train ...`: one command-line entry for every training stage, plus export, evaluate and the study.

    sdjax train autoencoder --config shapes_autoencoder --workdir runs/shapes_autoencoder
    sdjax train ldm         --config shapes_ldm         --workdir runs/shapes_ldm
    sdjax train export --workdir runs/shapes_ldm --out sdjax/assets/toy-shapes
    sdjax train controlnet  --config shapes_controlnet  --workdir runs/shapes_controlnet
    sdjax train classifier  --config shapes_classifier  --workdir runs/shapes_noise_classifier
    sdjax train lora        --config shapes_lora        --workdir runs/shapes_lora
    sdjax train evaluate --model sdjax/assets/toy-shapes --guidance 5 --out runs/eval
    sdjax train evaluate --controlnet --per-caption 2 --out runs/eval_controlnet   # the toy ControlNet

Every stage takes the same options (--config NAME_OR_FILE, --workdir, --set KEY=VALUE..., --until-step)
and runs `stage.train_and_evaluate(config, workdir)`; killed, the same command resumes.
"""

from __future__ import annotations

import json
import logging

from ..errors import SdjaxError
from .args import add_distributed_args, finite_float, init_distributed, positive_float, positive_int, seed

TOY = object()  # `--controlnet` given without a path: the shipped toy ControlNet

# stage name -> (module under sdjax.train, the shipped config it trains by default)
STAGES = {
    "autoencoder": ("autoencoder", "shapes_autoencoder"),
    "ldm": ("ldm", "shapes_ldm"),
    "controlnet": ("controlnet", "shapes_controlnet"),
    "upscaler": ("upscaler", "shapes_upscaler"),  # the toy cascade's stage 2 (32x32 -> 64x64)
    "classifier": ("classifier", "shapes_classifier"),
    "lora": ("lora", "shapes_lora"),
}


def add_commands(sub) -> None:
    t = sub.add_parser("train", help="train the toy latent diffusion model's stages; export and evaluate it")
    stages = t.add_subparsers(dest="stage", metavar="STAGE")
    for name, (_, default_config) in STAGES.items():
        s = stages.add_parser(name, help=f"train the {name} stage (sdjax.train.{STAGES[name][0]})")
        s.add_argument("--config", default=default_config,
                       help=f"a shipped config's name or a .py file with get_config() (default: {default_config})")
        s.add_argument("--workdir", required=True,
                       help="checkpoints, metrics, outputs (an existing workdir is resumed)")
        s.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override config keys, e.g. num_steps=200 'unet={\"layers_per_block\": 2}' "
                            "(repeatable: every --set's keys apply)")
        s.add_argument("--until-step", type=positive_int, default=None,
                       help="stop at this step (checkpointed); rerun to go on")
        add_distributed_args(s)
        s.set_defaults(func=cmd_stage, command_path=["train", name])

    e = stages.add_parser("export", help="write a stage-2 or upscaler workdir's model as a diffusers pipeline folder "
                                         "(a classifier workdir's classifier as its model folder)")
    e.add_argument("--workdir", required=True,
                   help="a stage-2 (sdjax train ldm), sdjax train upscaler or sdjax train classifier workdir")
    e.add_argument("--out", required=True, help="the pipeline folder to write")
    e.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    e.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    e.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it is not a pipeline folder sdjax exported")
    e.set_defaults(func=cmd_export, command_path=["train", "export"])

    v = stages.add_parser("evaluate", help="color/shape adherence and FD of a model on the shapes captions")
    v.add_argument("--model", default=None, help="pipeline folder (default: the shipped toy model)")
    v.add_argument("--classifier-dir", default="runs/shapes_classifier",
                   help="where the evaluation classifier is cached (trained there on first use)")
    v.add_argument("--guidance", type=finite_float, nargs="+", default=[5.0])
    v.add_argument("--steps", type=positive_int, default=25)
    v.add_argument("--per-caption", type=positive_int, default=4)
    v.add_argument("--seed", type=seed, default=0)
    v.add_argument("--out", default=None, help="folder for eval_g*.json and sample grids")
    u = v.add_mutually_exclusive_group()
    u.add_argument("--upscaler", default=None, metavar="PATH",
                   help="evaluate the cascade model -> this upscaler against bicubic upsampling (eval_cascade_*.json)")
    u.add_argument("--cascade", action="store_true", help="--upscaler with the shipped toy upscaler")
    u.add_argument("--controlnet", nargs="?", const=TOY, default=None, metavar="PATH",
                   help="evaluate a silhouette ControlNet (default: the shipped toy ControlNet) on held-out "
                        "silhouettes, with and without it: IoU with the silhouette, adherence (eval_controlnet.json)")
    v.add_argument("--control-scale", type=finite_float, default=None,
                   help="with --controlnet: its controlnet_conditioning_scale (default: 1)")
    v.add_argument("--noise-level", type=int, nargs="+", default=None,
                   help="the upscaler's noise level(s), one row each (default: the toy upscaler's)")
    v.add_argument("--upscaler-steps", type=positive_int, default=None)
    v.add_argument("--upscaler-guidance", type=finite_float, default=None)
    v.set_defaults(func=cmd_evaluate, command_path=["train", "evaluate"])

    c = stages.add_parser("compression-study", help="the LDM paper's compression-factor study at equal wall-clock")
    c.add_argument("--out", default="runs/compression")
    c.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8])
    c.add_argument("--image-size", type=int, default=32, choices=(32, 64), help="shapes images (64: f up to 16)")
    c.add_argument("--ae-seconds", type=positive_float, default=150)
    c.add_argument("--ldm-seconds", type=positive_float, default=300)
    c.add_argument("--per-caption", type=positive_int, default=2)
    c.add_argument("--classifier-dir", default="runs/shapes_classifier")
    c.add_argument("--report", default=None, help="markdown table (+ .png plot) to write; default OUT/compression.md")
    c.set_defaults(func=cmd_compression_study, command_path=["train", "compression-study"])
    gs = stages.add_parser("guidance-study", help="classifier guidance vs classifier-free guidance vs both: adherence "
                                                  "and FD (docs/guidance.md)")
    gs.add_argument("--out", default="runs/guidance")
    gs.add_argument("--report", default=None, help="markdown table (+ plots) to write; default OUT/guidance.md")
    gs.add_argument("--model", default=None, help="pipeline folder (default: the shipped toy model)")
    gs.add_argument("--classifier", default=None, help="guiding classifier folder (default: the shipped one)")
    gs.add_argument("--classifier-dir", default="runs/shapes_classifier",
                    help="where the evaluation classifier is cached (trained there on first use)")
    gs.add_argument("--per-caption", type=positive_int, default=4)
    gs.add_argument("--steps", type=positive_int, default=25)
    gs.add_argument("--seed", type=seed, default=0)
    gs.set_defaults(func=cmd_guidance_study, command_path=["train", "guidance-study"])
    t.set_defaults(func=lambda args: t.print_help(), command_path=["train"])


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def cmd_stage(args) -> None:
    import importlib

    from ..train.config import load_config

    init_distributed(args)  # before any JAX computation
    module = importlib.import_module(f"sdjax.train.{STAGES[args.stage][0]}")
    cfg = load_config(module.Config, args.config, args.set)
    _logging()
    print(json.dumps(module.train_and_evaluate(cfg, args.workdir, until_step=args.until_step), indent=2))


def cmd_export(args) -> None:
    import jax.numpy as jnp

    from ..train import classifier, upscaler
    from ..train.ldm import export_from_workdir

    if _workdir_command(args.workdir) == classifier.COMMAND:  # the classifier's float32 weights, as trained
        if args.no_ema or args.dtype != "float32":
            from ..errors import InputError

            raise InputError(f"{args.workdir} is a classifier workdir: --no-ema and --dtype are for stage-2 "
                             "(sdjax train ldm) workdirs; the classifier is exported as trained (float32, no EMA)")
        out = classifier.export_from_workdir(args.workdir, args.out, overwrite=args.overwrite)
    else:
        if upscaler.is_upscaler_workdir(args.workdir):
            export_from_workdir = upscaler.export_from_workdir
        out = export_from_workdir(args.workdir, args.out, dtype=jnp.dtype(args.dtype), use_ema=not args.no_ema,
                                  overwrite=args.overwrite)
    print(f"wrote {out}")


def _workdir_command(workdir) -> str | None:
    """The training command that made `workdir` (its output marker), or None."""
    from pathlib import Path

    from ..io import OUTPUT_MARKER

    try:
        return json.loads((Path(workdir) / OUTPUT_MARKER).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def cmd_evaluate(args) -> None:
    from ..assets import toy_model_path
    from ..io import check_output_dir, record_output
    from ..train.evaluate import evaluate

    command = "sdjax train evaluate"
    previous = check_output_dir(args.out, command, own_files=("samples_g5.png",)) if args.out else None
    _logging()
    model = args.model or toy_model_path()
    files = set((previous or {}).get("files", []))
    if args.upscaler or args.cascade:
        return _evaluate_cascade(args, model, files)
    for flag in ("noise_level", "upscaler_steps", "upscaler_guidance"):
        if getattr(args, flag) is not None:
            raise SdjaxError(f"--{flag.replace('_', '-')} needs --upscaler PATH or --cascade")
    if args.controlnet is not None:
        return _evaluate_controlnet(args, model, files)
    if args.control_scale is not None:
        raise SdjaxError("--control-scale needs --controlnet [PATH]")
    for g in args.guidance:
        print(json.dumps(evaluate(model, args.classifier_dir, g, args.steps, args.per_caption, args.seed,
                                  out_dir=args.out), indent=2))
        files |= {f"eval_g{g:g}.json", f"samples_g{g:g}.png"}
        if args.out:  # results for other guidance scales from earlier runs stay
            record_output(args.out, command, sorted(files))


def cmd_compression_study(args) -> None:
    from ..io import check_output_dir
    from ..train.compression_study import run_study

    check_output_dir(args.out, "sdjax train compression-study", own_files=("results.json",))
    report = run_study(args.out, args.factors, args.image_size, args.ae_seconds, args.ldm_seconds, args.per_caption,
                       args.classifier_dir, args.report)
    print(f"wrote {report} and {report.with_suffix('.png')}")


def _evaluate_cascade(args, model, files) -> None:
    from ..assets import TOY_UPSCALER_SETTINGS, toy_upscaler_path
    from ..io import record_output
    from ..train.evaluate import evaluate_cascade

    upscaler = str(toy_upscaler_path()) if args.cascade else args.upscaler
    levels = args.noise_level or [TOY_UPSCALER_SETTINGS["noise_level"]]
    steps = args.upscaler_steps or TOY_UPSCALER_SETTINGS["steps"]
    up_guidance = TOY_UPSCALER_SETTINGS["guidance"] if args.upscaler_guidance is None else args.upscaler_guidance
    for g in args.guidance:
        result = evaluate_cascade(model, upscaler, args.classifier_dir, g, args.steps, args.per_caption, args.seed,
                                  upscaler_steps=steps, upscaler_guidance=up_guidance, noise_levels=levels,
                                  out_dir=args.out)
        print(json.dumps(result, indent=2))
        if args.out:
            tag = f"g{g:g}_ug{up_guidance:g}"
            files |= {f"eval_cascade_{tag}.json", f"bicubic_{tag}.png", f"comparison_{tag}.png"}
            files |= {f"cascade_{tag}_nl{level}.png" for level in levels}
            record_output(args.out, "sdjax train evaluate", sorted(files))


def _evaluate_controlnet(args, model, files) -> None:
    from ..assets import toy_controlnet_path
    from ..io import record_output
    from ..train.evaluate import evaluate_controlnet

    controlnet = str(toy_controlnet_path()) if args.controlnet is TOY else args.controlnet
    scale = 1.0 if args.control_scale is None else args.control_scale
    if len(args.guidance) > 1:
        raise SdjaxError("--controlnet takes one --guidance (eval_controlnet.json holds one run)")
    result = evaluate_controlnet(model, controlnet, args.classifier_dir, args.guidance[0], args.steps,
                                 args.per_caption, args.seed, scale=scale, out_dir=args.out)
    print(json.dumps(result, indent=2))
    if args.out:
        record_output(args.out, "sdjax train evaluate", sorted(files | {"eval_controlnet.json",
                                                                         "controlnet_samples.png",
                                                                         "controlnet_disagree.png"}))


def cmd_guidance_study(args) -> None:
    from ..io import check_output_dir
    from ..train.guidance_study import run_study

    check_output_dir(args.out, "sdjax train guidance-study", own_files=("results.json",))
    _logging()
    report = run_study(args.out, args.report, args.model, args.classifier, args.classifier_dir, args.per_caption,
                       args.steps, args.seed)
    print(f"wrote {report} and its pictures")
