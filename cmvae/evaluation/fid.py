"""FID with pytorch-fid's InceptionV3 (pool3, 2048-d), weights from a local file only.

pytorch-fid's `InceptionV3()` constructor downloads its weights; here the same network is assembled from
`pytorch_fid.inception` pieces with no weights (torchvision's `weights=None` semantics) and the state dict
is loaded strictly from `pt_inception-2015-12-05-6726825d.pth`. Images go in as uint8 (generated images
are quantised in memory as a PNG writer would, with no file round trip), are resized on the device and
pass in large batches. The Frechet distance is computed in float64 from eigenvalues of symmetric matrices.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmvae_engine.cmvae.model import CMVAE

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_DIMS = 2048
MIN_SAMPLES = FID_DIMS
"""Fewer samples than feature dimensions give a singular covariance: refuse below this."""

_torchvision_schemas = None  # keeps the shim's Library alive: dropping it would unregister the schemas


def _define_torchvision_schemas() -> None:
    """Declare the `torchvision::nms`/`qnms` schemas that a CUDA torchvision wheel expects from its C++ ops.

    On a CPU torch with a mismatched torchvision (the only torchvision pip finds for torch 2.13 CPU) the
    import fails on registering fake kernels for these two ops; declaring them first makes the import (and
    the Inception layers) work, while `ops.nms` itself stays unavailable. Used only when the import fails.
    """
    global _torchvision_schemas
    try:
        torch.ops.torchvision.nms  # noqa: B018 - probing: defined already, nothing to do
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_schemas = lib


def import_pytorch_fid_inception():
    """`pytorch_fid.inception`, importing torchvision through the schema shim when a plain import fails."""
    try:
        import pytorch_fid.inception as inception
        return inception
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("pytorch_fid", "torchvision"):
            raise ModuleNotFoundError(f"FID needs pytorch-fid (and torchvision): `pip install "
                                      f"'cmvae-engine[fid]'` ({e})") from e
        raise
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [k for k in sys.modules if k.split(".")[0] in ("torchvision", "pytorch_fid")]:
        del sys.modules[name]  # half-imported modules from the failed attempt
    _define_torchvision_schemas()
    import pytorch_fid.inception as inception
    return inception


def fid_inception_structure() -> nn.Module:
    """torchvision's Inception3 (1008 classes, no aux head) with pytorch-fid's FID blocks, randomly
    initialised: the exact module whose state dict the FID weights file holds. Nothing is downloaded."""
    pfi = import_pytorch_fid_inception()
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


class FIDInception(nn.Module):
    """uint8 images [B, C, H, W] -> pool3 features [B, 2048], as pytorch-fid's InceptionV3([3]) computes
    them from [0, 1] images: bilinear resize to 299 (align_corners=False), scale to [-1, 1], blocks 0-3."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        i = inception
        self.blocks = nn.Sequential(
            i.Conv2d_1a_3x3, i.Conv2d_2a_3x3, i.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            i.Conv2d_3b_1x1, i.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            i.Mixed_5b, i.Mixed_5c, i.Mixed_5d, i.Mixed_6a, i.Mixed_6b, i.Mixed_6c, i.Mixed_6d, i.Mixed_6e,
            i.Mixed_7a, i.Mixed_7b, i.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # pytorch-fid reads images as RGB
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = x * 2.0 - 1.0
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.blocks(x).flatten(1)


def inception_weight_dirs(data_folder: str | Path) -> list[Path]:
    """Where a local copy of the FID weights may be: near the data (the PolyMNIST zip ships it) and
    torch's hub cache, where pytorch-fid itself stores it after a download."""
    d = Path(data_folder)
    dirs = [d, d / "PolyMNIST", d.parent, d.parent / "PolyMNIST", Path(torch.hub.get_dir()) / "checkpoints"]
    return list(dict.fromkeys(dirs))


def find_inception_weights(data_folder: str | Path) -> Path | None:
    for d in inception_weight_dirs(data_folder):
        if (d / FID_WEIGHTS_FILE).is_file():
            return d / FID_WEIGHTS_FILE
    return None


def load_fid_inception(path: str | Path, device: torch.device | str = "cpu") -> FIDInception:
    """The FID Inception with weights from a local file (strict, weights_only); never downloads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FID Inception weights at {path}; pass --inception-weights with the path "
                                f"of {FID_WEIGHTS_FILE} (shipped in the PolyMNIST zip); nothing is downloaded")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable weights file ({e}); use {FID_WEIGHTS_FILE}") from e
    net = fid_inception_structure()
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not the FID Inception weights ({FID_WEIGHTS_FILE}): "
                         f"{str(e).splitlines()[0][:300]}") from e
    model = FIDInception(net).to(device).eval()
    if model_device(model).type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # cuDNN's NHWC convolutions (unmeasured here)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8, rounding as a PNG writer does (x * 255 + 0.5, clamped)."""
    return images.mul(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8)


@torch.no_grad()
def inception_features(net: FIDInception, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """uint8 images [N, C, H, W] (any device) -> features [N, 2048] float32 on the network's device."""
    if images.dtype != torch.uint8:
        raise ValueError(f"inception_features takes uint8 images, got {images.dtype}; quantize() them first")
    device = model_device(net)
    out = [net(images[i:i + batch_size].to(device, non_blocking=True)) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, FID_DIMS, device=device)


# ----- Frechet distance ------------------------------------------------------------------------------


def _sym_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(sigma)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.T)


@dataclass
class GaussianStats:
    """Mean and covariance (float64) of a feature set; the covariance's square root is cached."""

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int
    _root: torch.Tensor | None = None

    @classmethod
    def of(cls, features: torch.Tensor) -> GaussianStats:
        n = features.shape[0]
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {n}")
        f = features.double()
        mu = f.mean(0)
        c = f - mu
        return cls(mu, c.T @ c / (n - 1), n)

    def root(self) -> torch.Tensor:
        if self._root is None:
            self._root = _sym_sqrt(self.sigma)
        return self._root


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)) for PSD S1, S2 (arrays or tensors).

    tr(sqrt(S1 S2)) is the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric
    PSD matrix: two symmetric eigendecompositions instead of a general matrix square root (2048-d, one
    thread of the shared 2-core CPU machine: 13 s against 43 s for scipy.linalg.sqrtm of S1 S2, same value
    to 2e-15 relative; 8 s per further set when the reference's root is cached, see fid_from_features).
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).double()
                                for a in (mu1, sigma1, mu2, sigma2))
    r = _sym_sqrt(sigma1)
    ev = torch.linalg.eigvalsh(_sym(r @ sigma2 @ r))
    tr_covmean = ev.clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + sigma1.trace() + sigma2.trace() - 2.0 * tr_covmean)


def fid_from_features(ref: GaussianStats, features: torch.Tensor) -> float:
    """Frechet distance between the Gaussian of `ref` and that of a feature set [n, d].

    With n >= d: eigenvalues of R S R (R = ref's cached covariance root, one d x d eigendecomposition per
    set). With n < d the same non-zero eigenvalues come from the n x n matrix C S_ref C^T / (n - 1)
    (C: centred features), so tiny sets cost almost nothing.
    """
    n, d = features.shape
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {n}")
    f = features.double().to(ref.mu.device)
    mu = f.mean(0)
    c = f - mu
    tr_gen = (c * c).sum() / (n - 1)
    if n < d:
        ev = torch.linalg.eigvalsh(_sym(c @ ref.sigma @ c.T)) / (n - 1)
    else:
        r = ref.root()
        ev = torch.linalg.eigvalsh(_sym(r @ (c.T @ c / (n - 1)) @ r))
    tr_covmean = ev.clamp(min=0).sqrt().sum()
    return float(((mu - ref.mu) ** 2).sum() + ref.sigma.trace() + tr_gen - 2.0 * tr_covmean)


# ----- FID of a model ----------------------------------------------------------------------------------


def check_sample_count(n: int, what: str, min_samples: int) -> None:
    if n < min_samples:
        raise ValueError(
            f"FID on {what}: {n} samples, at least {min_samples} are needed (fewer samples than the {FID_DIMS} "
            f"feature dimensions make the covariance singular and the score meaningless); raise --n-fid and "
            f"use a split with that many tuples (--fid-split train), or run without --fid")


@torch.no_grad()
def fid_scores(
    model: CMVAE, net: FIDInception, real: torch.Tensor, *, n: int, batch_size: int = 500,
    generator: torch.Generator | None = None, min_samples: int = MIN_SAMPLES,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Unconditional and conditional FID of a model against real images uint8 [M, N, C, H, W].

    Real: the first min(n, N) tuples of each modality. Unconditional: n prior samples per modality.
    Conditional: every source -> target pair, conditioned on those same real tuples, generated as conditional
    coherence generates them (one z ~ q_s(z|x_s); w_t from the prior for t != s, the source's own w for t == s:
    a self-reconstruction, as the reference's FID samples). Returns {'unconditional': {'m0': .., 'mean': ..},
    'conditional': {'m0->m1': .., 'mean': .., 'mean_cross': .., 'matrix': [[..]]}, 'n_real', 'n_unconditional',
    'n_conditional', 'seconds'}. 'mean' is the reference's conditional FID: per target the mean over every
    source, self-reconstruction included, then the mean over targets (= the mean of all entries);
    'mean_cross' leaves out s == t, the average that conditional coherence's 'average' takes.
    """
    m_count, n_real = real.shape[0], min(n, real.shape[1])
    check_sample_count(n_real, "real images", min_samples)
    check_sample_count(n, "generated samples", min_samples)
    t0 = time.perf_counter()
    device = model_device(net)
    ref = [GaussianStats.of(inception_features(net, real[m, :n_real], batch_size).to(device))
           for m in range(m_count)]
    log(f"FID: real features of {m_count} x {n_real} images in {time.perf_counter() - t0:.1f}s")

    feats: list[list[torch.Tensor]] = [[] for _ in range(m_count)]
    for start in range(0, n, batch_size):
        gen = quantize(model.generate(min(batch_size, n - start), generator=generator))
        for m in range(m_count):
            feats[m].append(inception_features(net, gen[m], batch_size))
    uncond = {f"m{m}": fid_from_features(ref[m], torch.cat(feats[m])) for m in range(m_count)}
    uncond["mean"] = float(np.mean([uncond[f"m{m}"] for m in range(m_count)]))
    log(f"FID: unconditional {uncond['mean']:.2f} ({time.perf_counter() - t0:.1f}s)")

    matrix = np.zeros((m_count, m_count))
    for s in range(m_count):
        feats = [[] for _ in range(m_count)]
        for start in range(0, n_real, batch_size):
            x = real[s, start:start + batch_size].to(model_device(model)).float().div_(255.0)
            gen = quantize(model.generate_conditional(x, s, generator=generator, own_w=True))
            for t in range(m_count):
                feats[t].append(inception_features(net, gen[t], batch_size))
        for t in range(m_count):
            matrix[s, t] = fid_from_features(ref[t], torch.cat(feats[t]))
        log(f"FID: conditional from m{s} done ({time.perf_counter() - t0:.1f}s)")
    cond: dict = {f"m{s}->m{t}": float(matrix[s, t]) for s in range(m_count) for t in range(m_count)}
    off = ~np.eye(m_count, dtype=bool)
    cond.update(mean=float(matrix.mean()), mean_cross=float(matrix[off].mean()), matrix=matrix.tolist())
    return {"unconditional": uncond, "conditional": cond, "n_real": n_real, "n_unconditional": n,
            "n_conditional": n_real, "seconds": time.perf_counter() - t0}
