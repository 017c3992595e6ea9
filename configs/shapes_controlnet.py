"""The shipped toy ControlNet: a silhouette-conditioned ControlNet on the frozen shapes model (sdjax/assets/toy-shapes).

Every key of `sdjax.train.controlnet.Config` is here: configs are the only place defaults live.
"""


def get_config():
    return dict(
        base_model=None,           # the frozen pipeline folder (None: the shipped toy model)
        # data: shapes images and their silhouettes (the LDM's own training images)
        num_train_images=8000,
        data_seed=0,
        # the control image's embedding: 32x32 silhouette -> 8x8 (the VAE's factor 4 = 2 ** (3 - 1))
        conditioning_embedding_out_channels=[16, 32, 64],
        caption_dropout=0.3,       # captions replaced by "": the ControlNet also steers CFG's unconditional half
        ema_decay=0.99,
        # optimisation
        seed=0,
        batch_size=16,
        num_steps=5600,            # 16 min on a shared 2-core Xeon; the shipped ControlNet is this run
        learning_rate=1e-3,
        warmup_steps=50,
        weight_decay=0.0,
        # bookkeeping and export
        checkpoint_every=400,
        keep_checkpoints=2,
        log_every=10,
        export_dir=None,           # default: <workdir>/controlnet
    )
