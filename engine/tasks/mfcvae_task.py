"""MFCVAE (multi-facet clustering, seed 003) as a training task: the model, its one-sample ELBO (eq. 14) under
the progressive schedule, the per-epoch scores of every facet against every labelled factor, and the end-of-run
grids (reconstructions, per-facet clusters, facet swap)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.format import read_manifest
from cmvae_engine.cmvae.mfcvae.config import MFCVAEConfig
from cmvae_engine.cmvae.mfcvae.evaluation import encode_facets, facet_table
from cmvae_engine.cmvae.mfcvae.model import MFCVAE
from cmvae_engine.cmvae.progress import ProgressFn, batches, report, shifted
from cmvae_engine.engine.config import TrainConfig
from cmvae_engine.engine.mfcvae_outputs import write_facet_grids, write_recon, write_swap_grid
from cmvae_engine.engine.mfcvae_recipe import ProgressiveRecipe
from cmvae_engine.engine.tasks.base import Task


class MFCVAEObjective(nn.Module):
    """forward(uint8 images [1, B, C, H, W], scalars {"alpha": [J], "kl_weight": [J]}) -> (loss x loss_scale, batch
    sum of minus the bound)."""

    def __init__(self, model: MFCVAE, loss_scale: float = 1.0):
        super().__init__()
        self.model = model
        self.loss_scale = loss_scale

    def forward(self, xb: torch.Tensor, scalars: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(to_float(xb[0]), scalars["alpha"], scalars["kl_weight"])
        loss = out.loss * self.loss_scale if self.loss_scale != 1.0 else out.loss
        return loss, -out.bound.detach().sum()


def check_fits(data_info: dict) -> tuple[int, int]:
    """Refuse data the MFCVAE networks cannot take, naming the files and the fix; returns (channels, size)."""
    root = Path(data_info["root"])
    shapes = [tuple(s) for s in data_info["image_shapes"]]
    if len(shapes) != 1:
        raise DataError(f"holds {len(shapes)} modalities; mfcvae is a single-modality model",
                        path=root, fix="train on a folder with m0.npy alone in every split (copy the modality you "
                                       "want into a new data folder with its labels.npy)")
    c, h, w = shapes[0]
    if h != w:
        raise DataError(f"images are {h}x{w}; the ladder networks take square images", path=root / "train" / "m0.npy",
                        fix="pad or crop the images to a square")
    return c, h


def eval_split(splits: dict) -> str:
    """The split the per-epoch scores come from: valid when the data set has one (the test split is for final
    reports), else test."""
    return "valid" if "valid" in splits else "test"


def factor_names(cfg: TrainConfig) -> list[str] | None:
    """The labelled factors of the run's data set (None when the manifest does not name them)."""
    from cmvae_engine.cmvae.data.resolve import resolve_dataset

    try:
        root = resolve_dataset(cfg.data.dataset, data_root=cfg.data.data_root)
        return (read_manifest(root) or {}).get("factors")
    except (DataError, OSError):
        return None


def default_factors(labels: np.ndarray, names: list[str] | None) -> list[str]:
    f = 1 if labels.ndim == 1 else labels.shape[1]
    if names is not None and len(names) == f:
        return list(names)
    return ["class"] if labels.ndim == 1 else [f"f{i}" for i in range(f)]


class MFCVAETask(Task):
    kind = "mfcvae"

    def adapt_config(self, cfg: TrainConfig, data_info: dict) -> None:
        cfg.model.image_channels, cfg.model.image_size = check_fits(data_info)
        cfg.model.n_modalities = 1

    def build_model(self, cfg: TrainConfig) -> MFCVAE:
        return MFCVAE(cfg.model)

    def build_recipe(self, cfg: TrainConfig) -> ProgressiveRecipe:
        return ProgressiveRecipe(cfg.model, seed=cfg.seed)

    def build_objective(self, model: MFCVAE, cfg: TrainConfig, recipe: ProgressiveRecipe, loss_scale: float
                        ) -> MFCVAEObjective:
        return MFCVAEObjective(model, loss_scale)

    def networks(self, model: MFCVAE) -> Iterable[tuple[str, nn.Module]]:
        """Every linear layer of the ladders (the step's autocast wrapper takes one tensor in and one out; the ladder
        modules take several: a facet's rung weight and the deepest facet's z)."""
        enc, dec = model.encoder, model.decoder
        for j, (block, head) in enumerate(zip(enc.blocks, enc.heads, strict=True)):
            yield f"encoder.blocks[{j}]", block
            yield f"encoder.heads[{j}]", head
        yield "decoder.top", dec.top
        for j, (down, rung) in enumerate(zip(dec.down, dec.rungs, strict=True)):
            yield f"decoder.down[{j}]", down
            yield f"decoder.rungs[{j}]", rung
        yield "decoder.mid", dec.mid
        yield "decoder.out", dec.out

    def describe(self, cfg: TrainConfig, data_info: dict) -> str:
        m: MFCVAEConfig = cfg.model
        return (f"mfcvae on {data_info['name']} ({data_info['n']['train']} train images), J={m.n_facets} facets, "
                f"K={','.join(map(str, m.n_clusters))}, z dims {','.join(map(str, m.z_dims))}, progressive "
                f"{m.solo_steps}+{m.fade_steps} steps")

    @torch.no_grad()
    def evaluate(self, model: MFCVAE, cfg: TrainConfig, splits: dict, device: torch.device,
                 progress: ProgressFn | None = None) -> dict:
        """The bound per datapoint and each facet's NMI with each labelled factor, on the valid split (test when
        there is none), as `{split}_bound` and `{split}_facet{j}_{factor}_nmi`."""
        name = eval_split(splits)
        split = splits[name]
        images = split.images[0]
        model.eval()
        g = torch.Generator(device=device)
        g.manual_seed(cfg.seed + 12345)
        n, bs = images.shape[0], max(cfg.optim.batch_size, 256)
        ones = torch.ones(model.n_facets, device=device)
        nb = batches(n, bs)
        work = 2 * nb
        total = torch.zeros((), device=device)
        for i, start in enumerate(range(0, n, bs)):
            total += model(to_float(images[start:start + bs].to(device)), ones, ones, generator=g).bound.sum()
            report(progress, i + 1, work)
        result = {f"{name}_bound": total.item() / n}
        if split.labels is not None:
            _, assign = encode_facets(model, images, bs, progress=shifted(progress, nb, work))
            factors = default_factors(split.labels, factor_names(cfg))
            for row in facet_table(assign, split.labels, factors, cfg.model.n_clusters):
                for factor, s in row["scores"].items():
                    result[f"{name}_facet{row['facet']}_{factor}_nmi"] = s["nmi"]
        model.train()
        return result

    @torch.no_grad()
    def save_outputs(self, model: MFCVAE, cfg: TrainConfig, splits: dict, out: Path, device: torch.device
                     ) -> list[str]:
        """recon.png, facet{j}_clusters.png per facet and facet_swap.png, from the test split's first images."""
        model.eval()
        g = torch.Generator(device=device)
        g.manual_seed(cfg.seed)
        images = splits["test"].images[0]
        files = [write_recon(model, images, out), *write_facet_grids(model, out, g),
                 write_swap_grid(model, images, out)]
        model.train()
        return files
