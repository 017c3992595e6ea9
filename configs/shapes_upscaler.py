"""The toy cascade's stage 2: a super-resolution LDM, 32x32 (the toy model's images) -> 64x64, in diffusers'
x4-upscaler layout (exported as a StableDiffusionUpscalePipeline folder: sdjax/assets/toy-shapes-upscaler).

Needs the f=2 autoencoder of configs/shapes_upscaler_autoencoder.py (`sdjax train autoencoder --config
shapes_upscaler_autoencoder --workdir runs/shapes_upscaler_autoencoder`). Every key of
`sdjax.train.upscaler.Config` is here: configs are the only place defaults live.
"""


def get_config():
    return dict(
        autoencoder_dir="runs/shapes_upscaler_autoencoder",  # the f=2 autoencoder's workdir (its vae/ is used)
        text_model=None,           # text encoder + tokenizer (frozen) from this pipeline folder; None: the toy model
        # data
        dataset="shapes",
        image_size=64,             # the low-resolution input is image_size / 2 (the autoencoder's factor)
        num_train_images=12000,
        data_seed=0,
        # UNet2DConditionModel config keys (sample_size, in/out_channels, cross_attention_dim and num_class_embeds
        # are filled in). 32x32 latents: no attention at 32x32, cross-attention only at 16x16 (as the SD x4
        # upscaler's high-resolution blocks), self- and cross-attention at 8x8 and in the mid block.
        unet=dict(block_out_channels=[32, 64, 96], layers_per_block=1,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  only_cross_attention=[False, True, False], attention_head_dim=4, norm_num_groups=16),
        # diffusion of the latents
        prediction_type="v_prediction",  # as the SD x4 upscaler
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        # noise augmentation of the low-resolution input (the exported low_res_scheduler: DDPM, the x4's betas)
        low_res_beta_schedule="scaled_linear",
        low_res_beta_start=0.0001,
        low_res_beta_end=0.02,
        max_noise_level=600,       # levels drawn from [0, 600]; at 600 the input keeps sqrt(alpha_bar) = 0.41
        caption_dropout=0.1,       # captions replaced by "" (classifier-free guidance)
        ema_decay=0.995,
        # optimisation
        seed=0,
        batch_size=16,
        num_steps=800,             # with the autoencoder's 1000 steps: about 20 minutes on a 2-core CPU
        learning_rate=1e-3,
        warmup_steps=100,
        weight_decay=0.01,
        # bookkeeping and export
        checkpoint_every=200,
        keep_checkpoints=2,
        log_every=20,
        sample_scheduler="ddim",   # the exported pipeline's scheduler: "ddim" or "pndm"
        export_dir=None,           # default: <workdir>/pipeline
    )
