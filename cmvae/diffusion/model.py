"""D-CMVAE as one module: the frozen CMVAE, one denoiser per modality and the EMA copies of the denoisers.

The CMVAE's parameters are frozen (requires_grad False, eval mode whatever the module's mode): the optimiser only
sees the denoisers, and x_hat is made on the fly under no_grad for every batch (conditioning.py). Its weights are
part of this module's state, so a D-CMVAE checkpoint is self-contained.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.diffusion.conditioning import Conditioning, reconstructions
from cmvae_engine.cmvae.diffusion.config import DiffusionConfig
from cmvae_engine.cmvae.diffusion.schedule import Schedule
from cmvae_engine.cmvae.diffusion.unet import UNet
from cmvae_engine.cmvae.model import CMVAE


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [-1, 1] (the diffusion's data scale)."""
    return x * 2.0 - 1.0


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) * 0.5).clamp(0, 1)


def ema_decay_at(decay: float, n_updates: int) -> float:
    return min(decay, (1.0 + n_updates) / (10.0 + n_updates))


class DCMVAE(nn.Module):
    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = c = config
        self.cmvae = CMVAE(ModelConfig(**c.cmvae))
        self.cmvae.requires_grad_(False)
        m = self.cmvae.config.n_modalities
        if c.n_modalities and c.n_modalities != m:
            raise ValueError(f"the CMVAE has {m} modalities, the diffusion config says {c.n_modalities}")
        self.denoisers = nn.ModuleList(UNet(c.image_channels, c.base, tuple(c.mults), c.n_res, c.dropout, c.attention)
                                       for _ in range(m))
        self.ema = copy.deepcopy(self.denoisers).requires_grad_(False)
        self.schedule = Schedule(c.timesteps, c.beta_1, c.beta_T)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.train()

    def train(self, mode: bool = True) -> DCMVAE:
        super().train(mode)
        self.cmvae.eval()  # frozen: never in training mode
        self.ema.eval()
        return self

    @property
    def n_modalities(self) -> int:
        return len(self.denoisers)

    def losses(self, x: torch.Tensor, generator: torch.Generator | None = None, nets: nn.ModuleList | None = None,
               cond: Conditioning | None = None) -> torch.Tensor:
        """x [M, B, C, H, W] float in [0, 1] -> [M, B]: per modality and datapoint the mean squared error between
        the true and the predicted noise, at t uniform over the T steps (the simple DDPM loss)."""
        nets = self.denoisers if nets is None else nets
        cond = reconstructions(self.cmvae, x, generator, self.config.p_cross) if cond is None else cond
        x0, x_hat = to_signed(x), to_signed(cond.x_hat)
        n_mod, b = x.shape[:2]
        t = torch.randint(0, self.config.timesteps, (n_mod, b), device=x.device, generator=generator)
        noise = torch.randn(x0.shape, device=x.device, dtype=x0.dtype, generator=generator)
        out = []
        for m, net in enumerate(nets):
            eps = net(self.schedule.q_sample(x0[m], t[m], noise[m]), t[m], x_hat[m])
            out.append((eps.float() - noise[m]).pow(2).flatten(1).mean(1))
        return torch.stack(out)

    @torch.no_grad()
    def update_ema(self) -> None:
        # the decay as a device tensor: no host read of the update count (one sync per step on CUDA otherwise)
        n = self.ema_updates.double()
        weight = 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=self.config.ema_decay).float()
        for e, p in zip(self.ema.parameters(), self.denoisers.parameters(), strict=True):
            e.lerp_(p.detach(), weight)
        for e, p in zip(self.ema.buffers(), self.denoisers.buffers(), strict=True):
            e.copy_(p)
        self.ema_updates += 1
