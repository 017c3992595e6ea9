"""Stage 1 of the shipped toy model: AutoencoderKL f=4 (32x32x3 -> 8x8x4) on 'shapes'."""


def get_config():
    return dict(
        dataset="shapes", image_size=32, num_train_images=12000, num_eval_images=256, data_seed=0,
        vae=dict(block_out_channels=[16, 32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8),
        seed=0, batch_size=32, num_steps=1000, learning_rate=1e-3, warmup_steps=100, kl_weight=1e-6,
        disc_start=None, checkpoint_every=200, keep_checkpoints=2, log_every=20,
    )
