"""Stage 1 of the shipped toy model: AutoencoderKL f=4 (32x32x3 -> 8x8x4) on 'shapes-anycolor' (the shapes images
with half the shapes in a random RGB colour, so that the latents carry colours the LDM never names: a LoRA can
teach one later), 3000 steps from a nearly deterministic posterior: 28.7 dB, shapes read back 97.5% of the time
(bench/autoencoder_ceiling.py; docs/controlnet.md). The shipped autoencoder is this config's run.

Every key of `sdjax.train.autoencoder.Config` is here: configs are the only place defaults live.
"""


def get_config():
    return dict(
        # data
        dataset="shapes-anycolor",  # "shapes" | "shapes-anycolor" | "folder:PATH" | "hf:NAME"
        image_size=32,
        num_train_images=12000,
        num_eval_images=256,
        data_seed=0,
        # AutoencoderKL config keys; f = 2 ** (len(block_out_channels) - 1)
        vae=dict(block_out_channels=[16, 32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8),
        # optimisation
        seed=0,
        batch_size=32,
        num_steps=3000,
        learning_rate=1e-3,
        warmup_steps=100,
        weight_decay=0.0,
        kl_weight=1e-6,            # KL per image element, relative to the L1
        disc_start=None,           # step to switch on the patch discriminator; None: no discriminator
        disc_weight=0.1,
        disc_learning_rate=2e-4,
        scale_images=2048,         # training images encoded to measure the latents' std (scaling_factor = 1/std)
        crop_size=None,            # None: whole images (a size: random crops of it, fully convolutional VAEs only)
        posterior_logvar_init=-8.0,  # None: flax's init (log-variance 0 at first)
        # bookkeeping
        checkpoint_every=200,
        keep_checkpoints=2,
        log_every=20,
    )
