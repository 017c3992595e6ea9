"""A LoRA that teaches the shipped toy model a colour word it never saw ("orange"), kept in line on the old prompts.

Every key of `sdjax.train.lora.Config` is here: configs are the only place defaults live.
"""


def get_config():
    return dict(
        base_model=None,           # a pipeline folder; None: the shipped toy model (sdjax/assets/toy-shapes)
        # data: concept images ("an orange circle on a white background", ...) mixed with the old shapes images
        concept="orange",          # a train.data CONCEPTS name: a new colour word ("orange") or shape ("star")
        num_concept_images=3000,
        num_prior_images=3000,     # old shapes images (the base model's training set), so old prompts keep working
        prior_fraction=0.5,        # share of each batch taken from the old shapes images
        data_seed=0,
        # the adapter: PEFT-style LoRA on these UNet layers (names as the Flax module names end; diffusers' in the
        # exported file). UNet only by default: the text encoder's LoRA needs peft >= 0.22 in diffusers (see docs).
        unet_targets=["to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "net_2", "conv1", "conv2"],
        text_encoder_targets=[],   # e.g. ["q_proj", "k_proj", "v_proj", "out_proj"]
        rank=8,
        alpha=8.0,
        caption_dropout=0.1,       # captions replaced by "" (classifier-free guidance keeps working)
        ema_decay=0.99,            # the exported adapter is the EMA of the factors (as the LDM and ControlNet stages)
        # pivotal tuning: the concept word becomes a new token (textual inversion) whose embedding, initialised as the
        # mean of these words' (each one token), is trained with the LoRA; exported as learned_embeds.safetensors.
        # [] keeps the base tokenizer's pieces of the word.
        token_init=["red", "yellow"],
        # optimisation
        seed=0,
        batch_size=64,
        num_steps=600,
        learning_rate=1e-3,
        warmup_steps=30,
        # bookkeeping
        checkpoint_every=200,
        keep_checkpoints=1,
        log_every=20,
        # evaluation at the end (train/evaluate.py's classifier, extended to the concept)
        eval_per_caption=4,
        eval_guidance=5.0,
        eval_steps=25,
    )
