"""The Python API for notebooks and scripts: a trained run, its data, and what its model does with images.

    from cmvae_engine.engine.api import load_run, read_split

    run = load_run("runs/demo")                 # pruned.pt when `prune` wrote one, else checkpoint.pt
    images, labels = read_split(run, "test")    # uint8 [M, N, C, H, W] and [N]
    codes = run.encode(images)                  # posterior means of z and w per modality
    found = run.assign(images)                  # cluster per tuple (majority vote), responsibilities
    samples = run.generate(8, cluster=run.clusters[0])   # uint8 [M, 8, C, H, W]

Images go in as numpy arrays or tensors, uint8 (0..255) or float in [0, 1], shaped [M, N, C, H, W] (or a list of
M arrays [N, C, H, W]); everything comes out as numpy arrays, images as uint8. Every call runs without
gradients, in batches, on the run's device; sampling calls take a `seed` and give the same draws for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cmvae_engine.cmvae.clustering import assign_by_rule, encode_split, to_float
from cmvae_engine.cmvae.data import read_dataset, resolve_dataset
from cmvae_engine.cmvae.distributions import rsample
from cmvae_engine.cmvae.generation import cluster_order
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.engine.config import TrainConfig
from cmvae_engine.engine.run import load_run as _load_checkpoint

PRUNED, TRAINED = "pruned.pt", "checkpoint.pt"
RULES = ("vote", "confidence")


@dataclass
class Encoding:
    """Posterior parameters per modality: locations (the means) and scales of q_m(z | x_m) and q_m(w | x_m)."""

    z: np.ndarray
    """[M, N, Dz]: posterior means of the shared latent (one draw instead with sample=True)."""
    z_scale: np.ndarray
    """[M, N, Dz]"""
    w: np.ndarray
    """[M, N, Dw]: posterior means of the private latents."""
    w_scale: np.ndarray
    """[M, N, Dw]"""


@dataclass
class Assignment:
    clusters: np.ndarray
    """[N] cluster id of each tuple under the rule (vote: majority over modalities; confidence: argmax of the
    modality-averaged responsibilities)."""
    per_modality: np.ndarray
    """[M, N] argmax_c p(c | z_m) of each modality alone."""
    responsibilities: np.ndarray
    """[M, N, K] p(c | z_m); pruned clusters have 0."""
    confidence: np.ndarray
    """[N] max_c of the modality-averaged responsibilities."""


def as_images(images, m: int | None = None) -> torch.Tensor:
    """[M, N, C, H, W] tensor (uint8 or float32 in [0, 1]) from a numpy array, a tensor or a list of M arrays."""
    if isinstance(images, list | tuple):
        images = np.stack([np.asarray(x) for x in images]) if not isinstance(images[0], torch.Tensor) \
            else torch.stack(list(images))
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a numpy array, a tensor or a list of them, got {type(images).__name__}")
    if x.dim() != 5:
        raise ValueError(f"images must be [M, N, C, H, W] (modalities, tuples, channels, height, width), got shape "
                         f"{tuple(x.shape)}")
    if m is not None and x.shape[0] != m:
        raise ValueError(f"images hold {x.shape[0]} modalities, the model has {m}")
    if x.dtype != torch.uint8:
        x = x.float()
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] -> uint8 numpy (rounded as a PNG writer does)."""
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


class Run:
    """A trained run folder, ready to use (returned by `load_run`)."""

    def __init__(self, run_dir: Path, checkpoint: str, config: TrainConfig, model: CMVAE, state: dict,
                 device: torch.device):
        self.run_dir, self.checkpoint, self.config, self.model, self.state, self.device = (
            run_dir, checkpoint, config, model, state, device)

    def __repr__(self) -> str:
        m = self.config.model
        return (f"Run({str(self.run_dir)!r}, {self.checkpoint}, {m.kind} M={m.n_modalities} K={m.n_clusters} "
                f"({len(self.clusters)} active), step {self.state.get('step')})")

    # ----- the prior ----------------------------------------------------------------------------------------
    @property
    def clusters(self) -> list[int]:
        """Active cluster ids, largest prior mass first."""
        return cluster_order(self.model)

    @property
    def prior_mass(self) -> np.ndarray:
        """[K] mixing weights pi (0 for pruned clusters)."""
        return self.model.prior_params()[0].detach().exp().cpu().numpy()

    # ----- data ---------------------------------------------------------------------------------------------
    def read_split(self, split: str = "test", data_root: str | Path | None = None):
        """(uint8 images [M, N, C, H, W], labels [N] or None) of the run's own data set."""
        return read_split(self.config.data.dataset, split, data_root=data_root or self.config.data.data_root)

    # ----- the model ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images, *, sample: bool = False, seed: int = 0, batch_size: int = 512) -> Encoding:
        """Posterior parameters of every modality; sample=True puts one draw z ~ q_m(z | x_m) in `z`."""
        x = as_images(images, self.config.model.n_modalities)
        g = torch.Generator(device=self.device).manual_seed(seed)
        parts = []
        for start in range(0, x.shape[1], batch_size):
            post = self.model.encode(to_float(x[:, start:start + batch_size].to(self.device)))
            z = post.z_loc
            if sample:
                z = rsample(post.z_loc, post.z_scale, self.config.model.family, generator=g)
            parts.append((z, post.z_scale, post.w_loc, post.w_scale))
        z, zs, w, ws = (torch.cat(t, dim=1).float().cpu().numpy() for t in zip(*parts, strict=True))
        return Encoding(z, zs, w, ws)

    @torch.no_grad()
    def assign(self, images, *, rule: str = "vote", sample: bool = False, seed: int = 0,
               batch_size: int = 512) -> Assignment:
        """Cluster of each tuple from p(c | z_m). sample=False (default) uses the posterior means of z, so the
        answer is deterministic; sample=True draws one z per tuple and modality, as `eval` and `prune` do."""
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        x = as_images(images, self.config.model.n_modalities)
        g = torch.Generator(device=self.device).manual_seed(seed)
        lat = encode_split(self.model, x, batch_size=batch_size, sample=sample, generator=g, device=self.device)
        clusters, confidence = assign_by_rule(lat.resp, rule)
        return Assignment(clusters.cpu().numpy(), lat.resp.argmax(-1).cpu().numpy(), lat.resp.cpu().numpy(),
                          confidence.cpu().numpy())

    @torch.no_grad()
    def generate(self, n: int, *, cluster: int | None = None, seed: int = 0) -> np.ndarray:
        """uint8 [M, n, C, H, W]: c ~ pi (or the given active cluster), z ~ p(z | c), w_m ~ p(w_m)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if cluster is not None and cluster not in self.clusters:
            raise ValueError(f"cluster {cluster} is not active in {self.run_dir / self.checkpoint}; active: "
                             f"{sorted(self.clusters)}")
        g = torch.Generator(device=self.device).manual_seed(seed)
        return to_uint8(self.model.generate(n, cluster=cluster, generator=g))

    @torch.no_grad()
    def generate_from(self, images, source: int, *, seed: int = 0) -> np.ndarray:
        """Cross-modal generation: every modality decoded from modality `source`'s z (w from the prior) ->
        uint8 [M, N, C, H, W]."""
        x = as_images(images, self.config.model.n_modalities)
        g = torch.Generator(device=self.device).manual_seed(seed)
        return to_uint8(self.model.generate_conditional(to_float(x[source].to(self.device)), source, generator=g))

    @torch.no_grad()
    def reconstruct(self, images) -> np.ndarray:
        """Self-reconstructions from the posterior means -> uint8 [M, N, C, H, W]."""
        x = as_images(images, self.config.model.n_modalities)
        return to_uint8(self.model.reconstruct(to_float(x.to(self.device))))


def load_run(run_dir: str | Path, *, checkpoint: str | None = None, device: str | torch.device = "cpu") -> Run:
    """A run folder of `cmvae-engine train`; its model from `pruned.pt` when `prune` wrote one, else
    `checkpoint.pt` (or the file named by `checkpoint`)."""
    run_dir = Path(run_dir)
    if checkpoint is None:
        checkpoint = PRUNED if (run_dir / PRUNED).is_file() else TRAINED
    device = torch.device(device)
    loaded = _load_checkpoint(run_dir, checkpoint=checkpoint, device=device)
    if not isinstance(loaded.model, CMVAE):
        raise ValueError(f"{run_dir}: the API serves CMVAE and MMVAE+ runs; this one is {loaded.config.model.kind}")
    return Run(run_dir, checkpoint, loaded.config, loaded.model, loaded.state, device)


def read_split(dataset: str | Path | Run, split: str = "test", *, data_root: str | Path | None = None):
    """(uint8 images [M, N, C, H, W], labels [N] or None) of a data set split: `polydigits`, `polymnist`, a data
    folder, or a Run (its own data set)."""
    if isinstance(dataset, Run):
        return dataset.read_split(split, data_root)
    ds = read_dataset(resolve_dataset(str(dataset), data_root=data_root), mmap=True)
    part = ds.split(split)
    images = np.stack([np.asarray(m) for m in part.modalities])
    return images, None if part.labels is None else np.asarray(part.labels)


def encode(run: Run, images, **kw) -> Encoding:
    """run.encode(images, ...)."""
    return run.encode(images, **kw)


def assign(run: Run, images, **kw) -> Assignment:
    """run.assign(images, ...)."""
    return run.assign(images, **kw)


def generate(run: Run, n: int, **kw) -> np.ndarray:
    """run.generate(n, ...)."""
    return run.generate(n, **kw)


def reconstruct(run: Run, images) -> np.ndarray:
    """run.reconstruct(images)."""
    return run.reconstruct(images)


__all__ = ["Assignment", "Encoding", "Run", "assign", "encode", "generate", "load_run", "read_split",
           "reconstruct"]
