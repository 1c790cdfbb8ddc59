"""MFCVAE (multi-facet clustering VAE, seed 003): J facets, each a latent z_j with a mixture-of-Gaussians prior,
on ladder networks; the same fused ops as CMVAE (kernels/)."""
