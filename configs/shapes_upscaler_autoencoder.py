"""The toy cascade's stage-2 autoencoder: AutoencoderKL f=2 (64x64x3 -> 32x32x4) on 'shapes' at 64x64.

Its latents have the 32x32 size of stage 1's images, as diffusers' upscaler format wants (the latents have the
low-resolution image's size; the VAE's decoder does the upsampling). No attention in the mid block: at 32x32 it
would attend over 1024 positions and cost more than the rest of the autoencoder. Trained with the toy model's
stage-1 code (`sdjax train autoencoder`); `sdjax train upscaler` (configs/shapes_upscaler.py) reads its vae/.

Every key of `sdjax.train.autoencoder.Config` is here: configs are the only place defaults live.
"""


def get_config():
    return dict(
        # data
        dataset="shapes",
        image_size=64,
        num_train_images=12000,
        num_eval_images=256,
        data_seed=0,
        # AutoencoderKL config keys; f = 2 ** (len(block_out_channels) - 1) = 2
        vae=dict(block_out_channels=[16, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8,
                 mid_block_add_attention=False),
        # optimisation
        seed=0,
        batch_size=32,
        num_steps=600,
        learning_rate=2e-3,
        warmup_steps=50,
        weight_decay=0.0,
        kl_weight=1e-6,            # KL per image element, relative to the L1
        disc_start=None,           # no patch discriminator
        disc_weight=0.1,
        disc_learning_rate=2e-4,
        scale_images=2048,         # training images encoded to measure the latents' std
        # bookkeeping
        checkpoint_every=100,
        keep_checkpoints=2,
        log_every=20,
    )
