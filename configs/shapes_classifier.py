"""The shipped guiding classifier (sdjax/assets/toy-shapes-classifier): color, shape and background from the toy
model's noisy 8x8x4 latents and t.

Every key of `sdjax.train.classifier.Config` is here: configs are the only place defaults live.
"""


def get_config():
    return dict(
        model=None,                # diffusion model folder (its vae/ and scheduler/); None: the shipped toy model
        # data
        dataset="shapes",
        image_size=32,
        num_train_images=12000,
        num_eval_images=512,       # held-out images for the accuracy at each of eval_timesteps
        data_seed=0,               # the toy model's own training images
        # NoiseClassifier config keys (in_channels, sample_size, num_train_timesteps, heads, num_labels and
        # label_names are filled in from the VAE, the noise schedule and the dataset)
        classifier=dict(block_out_channels=[32, 64], layers_per_block=2, norm_num_groups=32),
        # optimisation
        seed=0,
        batch_size=128,
        num_steps=3000,
        learning_rate=1e-3,
        warmup_steps=100,
        weight_decay=0.01,
        # bookkeeping and export
        checkpoint_every=500,
        keep_checkpoints=2,
        log_every=20,
        eval_timesteps=[0, 200, 400, 600, 800, 900, 999],
        export_dir=None,           # default: <workdir>/classifier
    )
