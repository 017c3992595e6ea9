"""`sdjax train ...`: one command-line entry for every training stage, plus export, evaluate and the study.

    sdjax train autoencoder --config shapes_autoencoder --workdir runs/shapes_autoencoder
    sdjax train ldm         --config shapes_ldm         --workdir runs/shapes_ldm
    sdjax train export --workdir runs/shapes_ldm --out sdjax/assets/toy-shapes
    sdjax train lora        --config shapes_lora        --workdir runs/shapes_lora
    sdjax train evaluate --model sdjax/assets/toy-shapes --guidance 5 --out runs/eval

Every stage takes the same options (--config NAME_OR_FILE, --workdir, --set KEY=VALUE..., --until-step)
and runs `stage.train_and_evaluate(config, workdir)`; killed, the same command resumes.
"""

from __future__ import annotations

import json
import logging

from .args import finite_float, positive_float, positive_int, seed

# stage name -> (module under sdjax.train, the shipped config it trains by default)
STAGES = {
    "autoencoder": ("autoencoder", "shapes_autoencoder"),
    "ldm": ("ldm", "shapes_ldm"),
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
        s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="override config keys, e.g. num_steps=200 'unet={\"layers_per_block\": 2}'")
        s.add_argument("--until-step", type=positive_int, default=None,
                       help="stop at this step (checkpointed); rerun to go on")
        s.set_defaults(func=cmd_stage, command_path=["train", name])

    e = stages.add_parser("export", help="write a stage-2 workdir's model as a diffusers pipeline folder")
    e.add_argument("--workdir", required=True, help="a stage-2 (sdjax train ldm) workdir")
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
    t.set_defaults(func=lambda args: t.print_help(), command_path=["train"])


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def cmd_stage(args) -> None:
    import importlib

    from ..train.config import load_config

    module = importlib.import_module(f"sdjax.train.{STAGES[args.stage][0]}")
    cfg = load_config(module.Config, args.config, args.set)
    _logging()
    print(json.dumps(module.train_and_evaluate(cfg, args.workdir, until_step=args.until_step), indent=2))


def cmd_export(args) -> None:
    import jax.numpy as jnp

    from ..train.ldm import export_from_workdir

    out = export_from_workdir(args.workdir, args.out, dtype=jnp.dtype(args.dtype), use_ema=not args.no_ema,
                              overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_evaluate(args) -> None:
    from ..assets import toy_model_path
    from ..io import check_output_dir, record_output
    from ..train.evaluate import evaluate

    command = "sdjax train evaluate"
    previous = check_output_dir(args.out, command, own_files=("samples_g5.png",)) if args.out else None
    _logging()
    model = args.model or toy_model_path()
    files = set((previous or {}).get("files", []))
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
