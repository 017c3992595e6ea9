"""Stage 2 of the shipped toy model: text-conditioned UNet on the 8x8x4 latents of shapes_autoencoder.

Every key of `sdjax.train.ldm.Config` is here: configs are the only place defaults live.
"""


def get_config():
    return dict(
        autoencoder_dir="runs/shapes_autoencoder",  # stage 1's workdir (its vae/ folder is used)
        # data
        dataset="shapes",
        image_size=32,
        num_train_images=12000,
        data_seed=0,
        model_max_length=16,       # tokens per caption (= the text encoder's max_position_embeddings)
        # UNet2DConditionModel config keys (sample_size, in/out_channels, cross_attention_dim are filled in)
        unet=dict(block_out_channels=[64, 96], layers_per_block=1,
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                  attention_head_dim=4, norm_num_groups=32),
        # CLIPTextConfig keys (vocab_size, max_position_embeddings and the special token ids are filled in)
        text_encoder=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                          hidden_act="quick_gelu"),
        # diffusion
        prediction_type="epsilon",  # or "v_prediction"
        beta_schedule="scaled_linear",  # or "cosine", "linear"
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        caption_dropout=0.1,       # captions replaced by "" (classifier-free guidance)
        ema_decay=0.995,
        # optimisation
        seed=0,
        batch_size=64,
        num_steps=2500,
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
