"""cmvae-engine: the training loop, data pipelines, checkpoints and the command line."""
