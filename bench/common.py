"""Shared helpers for the bench/ scripts: model folders, machine info, quiet-machine check, statistics.

Model configs:
  tiny  -- tests/tiny_pipeline.py's random SD folder (the test model).
  sd15  -- the real Stable Diffusion 1.5 UNet / VAE / CLIP-text configs with random weights, saved by
           diffusers/transformers PyTorch (safetensors) into a cache dir; the tokenizer is the tiny test BPE
           padded to 77 tokens (its ids are < 49408, the text config's vocab_size).
  sdxl  -- the real SDXL base 1.0 UNet / VAE / text_encoder (CLIP ViT-L) / text_encoder_2 (OpenCLIP bigG)
           configs with random weights, the same way (~3.5 B parameters, ~14 GB fp32 on disk); tokenizers,
           scheduler (Euler) and model_index.json from sdjax.testing's tiny SDXL pipeline.
Folders are cached under $SDJAX_BENCH_CACHE (default /tmp/sdjax-bench) and reused across runs.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SDJAX_BENCH_CACHE", "/tmp/sdjax-bench"))
OLDFLAX_PYTHON = Path(os.environ.get("SDJAX_BENCH_OLDFLAX_PYTHON", ROOT / ".bench-venv-oldflax" / "bin" / "python"))

# ---- Stable Diffusion 1.5's component configs (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/ config.json)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    initializer_factor=1.0, attention_dropout=0.0, dropout=0.0,
)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)

# ---- SDXL base 1.0's component configs (stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/,
# text_encoder_2/ config.json; the UNet's is tests/test_unet_sdxl.py's SDXL_BASE_UNET_CONFIG)
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), center_input_sample=False,
    cross_attention_dim=2048, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
)
SDXL_VAE = SD15_VAE | dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT = SD15_TEXT  # CLIP ViT-L/14's text tower, as SD 1.5's
SDXL_TEXT_2 = SD15_TEXT | dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                               hidden_act="gelu", projection_dim=1280)  # OpenCLIP ViT-bigG/14's text tower

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red circle on a blue square",
           "a green cat", "a dog on the moon"]


def build_sd15_folder(folder: Path, seed: int = 0) -> Path:
    """SD-1.5-shaped random StableDiffusionPipeline saved by diffusers PyTorch (safetensors)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdjax.testing import write_tiny_tokenizer

    torch.manual_seed(seed)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_tiny_tokenizer(tmp / "_tok", max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "_tok")
    assert len(tokenizer) <= SD15_TEXT["vocab_size"], len(tokenizer)
    text = SD15_TEXT | {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
                        "pad_token_id": tokenizer.pad_token_id}
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET), scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "_tok")
    cfg_path = tmp / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"clip_sample": False}, indent=2))
    del pipe
    tmp.rename(folder)
    return folder


def build_sdxl_folder(folder: Path, seed: int = 0) -> Path:
    """SDXL-base-shaped random StableDiffusionXLPipeline folder, saved by diffusers/transformers PyTorch.

    model_index.json, scheduler/ (EulerDiscreteScheduler, SDXL's config) and both tokenizers (the tiny test BPE,
    77 tokens; tokenizer_2 pads with "!") come from `sdjax.testing.build_tiny_sdxl_pipeline`, which
    StableDiffusionXLPipeline.save_pretrained wrote; the four models are then replaced by the real configs with
    random (default-init) weights, each built and saved on its own (`save_pretrained`, safetensors, 2 GB shards)
    and freed before the next, so that the build peaks near the UNet's 10.3 GB instead of all 14 GB plus a
    serialized copy."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdjax.testing import build_tiny_sdxl_pipeline

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_sdxl_pipeline(tmp, seed=seed)

    def save(sub, model):
        shutil.rmtree(tmp / sub)
        model.save_pretrained(tmp / sub, safe_serialization=True, max_shard_size="2GB")
        print(f"[bench] sdxl: wrote {sub} ({sum(p.numel() for p in model.parameters()):,} parameters)",
              file=sys.stderr)

    torch.manual_seed(seed)
    for sub, cls, cfg in (("text_encoder", CLIPTextModel, SDXL_TEXT),
                          ("text_encoder_2", CLIPTextModelWithProjection, SDXL_TEXT_2)):
        tok = CLIPTokenizer.from_pretrained(tmp / sub.replace("text_encoder", "tokenizer"))
        assert len(tok) <= cfg["vocab_size"], len(tok)
        cfg = cfg | {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
                     "pad_token_id": tok.pad_token_id}
        save(sub, cls(CLIPTextConfig(**cfg)))
    save("vae", AutoencoderKL(**SDXL_VAE))
    save("unet", UNet2DConditionModel(**SDXL_UNET))
    tmp.rename(folder)
    return folder


def model_folder(config: str) -> Path:
    """The cached diffusers (safetensors) folder for `config` ('tiny', 'sd15' or 'sdxl'), built on first use."""
    folder = CACHE / config
    if (folder / "model_index.json").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if config == "tiny":
        from sdjax.testing import build_tiny_pipeline

        tmp = CACHE / "tiny.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_pipeline(tmp)
        tmp.rename(folder)
    elif config == "sd15":
        build_sd15_folder(folder)
    elif config == "sdxl":
        build_sdxl_folder(folder)
    else:
        raise SystemExit(f"unknown config {config!r} (tiny, sd15, sdxl)")
    print(f"[bench] built {folder} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return folder


def oldflax_folder(config: str) -> Path:
    """The same weights as diffusers 0.35's Flax loader wants them: pickled .bin, `text_model.`-prefixed keys."""
    src = model_folder(config)
    dst = CACHE / f"{config}-oldflax"
    if (dst / "model_index.json").is_file():
        return dst
    import torch
    from safetensors.torch import load_file

    tmp = CACHE / f"{config}-oldflax.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "pytorch_model")):
        st = next((src / sub).glob("*.safetensors"))
        sd = load_file(st)
        if sub == "text_encoder":
            sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
        torch.save(sd, tmp / sub / f"{name}.bin")
    # transformers 5 wrote only tokenizer.json; transformers 4.57's CLIPTokenizer (slow) wants vocab.json + merges.txt
    from sdjax.testing import write_tiny_tokenizer

    shutil.rmtree(tmp / "_tok", ignore_errors=True)
    write_tiny_tokenizer(tmp / "_tok", max_length=77)
    for f in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy(tmp / "_tok" / f, tmp / "tokenizer" / f)
    shutil.rmtree(tmp / "_tok")
    tmp.rename(dst)
    return dst


# ---- machine / environment
def load_avg() -> tuple[float, float, float]:
    return os.getloadavg()


def busy_processes() -> list[str]:
    """Other engineers' training / test processes (sdjax train ..., pytest)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    me = {os.getpid(), os.getppid()}
    busy = []
    for line in out:
        pid, _, args = line.strip().partition(" ")
        if int(pid) in me or "grep" in args:
            continue
        if "sdjax train" in args or "sdjax.cli train" in args or "pytest" in args:
            busy.append(line.strip()[:120])
    return busy


def wait_quiet(max_wait_s: float = 2400, max_load: float = 1.5, poll_s: float = 30) -> dict:
    """Sleep until no training/pytest process runs and the 1-min load < max_load (or max_wait_s passes)."""
    t0 = time.time()
    while True:
        busy, load = busy_processes(), load_avg()
        quiet = not busy and load[0] < max_load
        if quiet or time.time() - t0 > max_wait_s:
            state = dict(quiet=quiet, load_avg=[round(x, 2) for x in load], busy=busy,
                         waited_s=round(time.time() - t0))
            print(f"[bench] machine {'quiet' if quiet else 'NOT quiet (measuring under load)'}: {state}",
                  file=sys.stderr)
            return state
        time.sleep(poll_s)


def machine_info() -> dict:
    import jax

    info = dict(date=time.strftime("%Y-%m-%d %H:%M"), host=platform.node(), cpu=_cpu_name(), cores=os.cpu_count(),
                python=platform.python_version(), jax=jax.__version__, jax_backend=jax.default_backend(),
                jax_devices=[str(d) for d in jax.devices()])
    for mod in ("flax", "diffusers", "transformers", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def rss_mb() -> float:
    """Current resident set size (MiB), from /proc (no psutil needed in the old-Flax venv)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return dict(n=len(xs), median=statistics.median(xs), min=xs[0], max=xs[-1],
                spread=(xs[-1] - xs[0]) / statistics.median(xs) if xs and statistics.median(xs) else 0.0,
                runs=[round(x, 4) for x in xs])


def fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def run_child(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run a worker subprocess that prints one JSON line starting with 'RESULT ' on stdout."""
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    wall = time.time() - t0
    res = None
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
    if p.returncode != 0 or res is None:
        return dict(error=f"exit {p.returncode}: " + (p.stderr.strip().splitlines() or [""])[-1][:400],
                    stderr_tail=p.stderr[-3000:], wall_s=wall)
    res["process_wall_s"] = wall
    res["t_launch"] = t0
    return res


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)
