"""D-CMVAE (seed 001, section 3.3): one conditional DDPM per modality on top of a frozen CMVAE.

- schedule.py: the forward process (linear betas, alpha-bar, the Gaussian posterior q(x_{t-1} | x_t, x_0));
- unet.py: the small conditional UNet for 28x28 images (padded to 32 inside, cropped back);
- conditioning.py: x_hat of eq. 8 (self- or cross-reconstruction, each with probability 1/2);
- model.py: the frozen CMVAE, the denoisers and their EMA copies as one module; the epsilon loss;
- sampling.py: DDPM ancestral sampling and DDIM (eta = 0 deterministic, eta = 1 DDPM's posterior variance);
- config.py: the model section of a D-CMVAE run.
"""
