"""Training the toy latent diffusion model: stage 1 (`train.autoencoder`), stage 2 (`train.ldm`),
`train.export` (diffusers-format folder) and `train.evaluate` (classifier-based adherence and FD).
See train/README.md for the commands that reproduce the shipped model."""
