"""The toy cascade's stage-2 autoencoder: AutoencoderKL f=2 (64x64x3 -> 32x32x12) on 'shapes' at 64x64.

Its latents have the 32x32 size of stage 1's images, as diffusers' upscaler format wants (the latents have the
low-resolution image's size; the VAE's decoder does the upsampling). 12 latent channels: as many numbers as the
64x64 image's pixels (2 x 2 x 3 per latent position), so the autoencoder need not compress, only reshape: a latent
upscaler can be no sharper than its autoencoder's reconstruction, and that must beat bicubic upsampling
(`bench/upscaler_ceiling.py`; with 4 channels, 600 steps on whole images gave 25.8 dB against bicubic's 30.5).
No attention in the mid block: the autoencoder is fully convolutional, so it trains on random 32x32 crops (four
times cheaper a step than whole images) and runs on whole 64x64 images. The posterior starts nearly
deterministic (log-variance -8): the latents are not drowned in sampling noise while the network learns.
Trained with the toy model's stage-1 code (`sdjax train autoencoder`); `sdjax train upscaler`
(configs/shapes_upscaler.py) reads its vae/.

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
        vae=dict(block_out_channels=[16, 32], layers_per_block=1, latent_channels=12, norm_num_groups=8,
                 mid_block_add_attention=False),
        # optimisation
        seed=0,
        batch_size=32,
        num_steps=1000,
        learning_rate=3e-3,
        warmup_steps=20,
        weight_decay=0.0,
        kl_weight=1e-6,            # KL per image element, relative to the L1
        disc_start=None,           # no patch discriminator
        disc_weight=0.1,
        disc_learning_rate=2e-4,
        scale_images=2048,         # training images encoded to measure the latents' std
        crop_size=32,              # random 32x32 crops of the 64x64 images (multiples of 2: the latent grid)
        posterior_logvar_init=-8.0,
        # bookkeeping
        checkpoint_every=100,
        keep_checkpoints=2,
        log_every=20,
    )
