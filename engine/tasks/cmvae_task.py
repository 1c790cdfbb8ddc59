"""CMVAE and MMVAE+ (its K = 1 special case) as a training task: the model, its objective module, the paper and
fast recipes, the test-split evaluation of each epoch and the end-of-run image grids."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from cmvae_engine.cmvae.clustering import assign_clusters, encode_split, to_float
from cmvae_engine.cmvae.config import IMAGE_CHANNELS
from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.format import IMAGE_SIZE
from cmvae_engine.cmvae.hetero import HeteroCMVAE, is_heterogeneous
from cmvae_engine.cmvae.metrics import clustering_scores
from cmvae_engine.cmvae.model import CMVAE, Posterior
from cmvae_engine.cmvae.objectives import loss_fn
from cmvae_engine.cmvae.progress import ProgressFn, batches, report, shifted
from cmvae_engine.engine.checkpoint import atomic_write_json
from cmvae_engine.engine.config import TrainConfig
from cmvae_engine.engine.images import cluster_labels, save_grid
from cmvae_engine.engine.recipes import PaperRecipe, build_recipe
from cmvae_engine.engine.step import StepOptions
from cmvae_engine.engine.tasks.base import Task
from cmvae_engine.engine.tasks.modality_fit import fit_modalities

CLUSTERS = "clusters.json"


class CMVAEObjective(nn.Module):
    """The model and its objective as one forward, so that DDP and torch.compile see the whole step.

    forward(uint8 images [M, B, C, H, W], scalars {"beta", "aux_weight"}) -> (loss to minimise x loss_scale,
    batch sum of minus the bound). loss_scale = world size under DDP: the loss is a SUM over the batch and DDP
    averages gradients over ranks, so scaling restores the single-process gradient of the global batch.
    """

    def __init__(self, model: CMVAE, objective: str, n_samples: int, loss_scale: float = 1.0,
                 aux: Callable[[Posterior], torch.Tensor] | None = None):
        super().__init__()
        self.model = model
        self.objective = objective
        self.n_samples = n_samples
        self.loss_scale = loss_scale
        self.aux = aux
        """A recipe's extra term (engine/recipes.py), added times the step's aux_weight; None: the objective only."""

    def forward(self, xb: torch.Tensor, scalars: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = loss_fn(self.model, to_float(xb), objective=self.objective, n_samples=self.n_samples,
                      beta=scalars["beta"])
        loss = out.loss
        if self.aux is not None and "aux_weight" in scalars:
            loss = loss + scalars["aux_weight"] * self.aux(out.posterior)
        loss = loss * self.loss_scale if self.loss_scale != 1.0 else loss
        return loss, -out.bound.sum()


def check_fits_count(kind: str, data_info: dict) -> None:
    """At least 2 modalities: the model is multimodal."""
    root = Path(data_info["root"])
    shapes = data_info["image_shapes"]
    if len(shapes) < 2:
        raise DataError(f"holds {len(shapes)} modality ({', '.join(f'm{k}.npy' for k in range(len(shapes)))} in "
                        f"each split); {kind} is a multimodal model and needs at least 2",
                        path=root, fix="add a second modality (m1.npy in every split), or train on another data set")


def check_fits(kind: str, data_info: dict) -> int:
    """Refuse data the CMVAE networks cannot take, naming the files and the fix; returns the channel count.

    The one place that says what the networks accept: at least 2 modalities (the model is multimodal), every
    modality with the same channel count, 1 (grey) or 3 (RGB), and 28 x 28 images. Heterogeneous data (other
    image sizes, captions, per-modality likelihoods) is fitted by modality_fit.py instead."""
    check_fits_count(kind, data_info)
    root = Path(data_info["root"])
    shapes = [tuple(s) for s in data_info["image_shapes"]]
    channels = sorted({c for c, _, _ in shapes})
    files = ", ".join(f"m{k}.npy: {c}" for k, (c, _, _) in enumerate(shapes))
    if len(channels) > 1:
        raise DataError(f"the modalities have different channel counts ({files}); the networks take one channel "
                        "count for every modality for now", path=root / "train",
                        fix="convert every modality to the same count: grey to RGB with np.repeat(x, 3, axis=1), "
                            "RGB to grey with x.mean(axis=1, keepdims=True).round().astype(np.uint8)")
    if channels[0] not in IMAGE_CHANNELS:
        raise DataError(f"images have {channels[0]} channels ({files}); the networks take 1 (grey) or 3 (RGB)",
                        path=root / "train" / "m0.npy",
                        fix="drop an alpha channel with x[:, :3], or convert the images to grey or RGB")
    for k, (_, h, w) in enumerate(shapes):
        if (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"images are {h}x{w}; the networks take {IMAGE_SIZE}x{IMAGE_SIZE} only for now",
                            path=root / "train" / f"m{k}.npy", fix=f"resize the images to {IMAGE_SIZE}x{IMAGE_SIZE}")
    return channels[0]


class CMVAETask(Task):
    kind = "cmvae"

    def adapt_config(self, cfg: TrainConfig, data_info: dict) -> None:
        """The data decides M and the image channels, once check_fits has accepted it; heterogeneous data (other
        image sizes, captions) decides one network and likelihood spec per modality instead (modality_fit.py)."""
        specs = fit_modalities(cfg.model, data_info)
        if specs is None:
            cfg.model.image_channels = check_fits(cfg.model.kind, data_info)
        else:
            check_fits_count(cfg.model.kind, data_info)
            cfg.model.modalities = specs
        cfg.model.n_modalities = len(data_info["modalities"])

    def build_model(self, cfg: TrainConfig) -> CMVAE:
        return HeteroCMVAE(cfg.model) if is_heterogeneous(cfg.model) else CMVAE(cfg.model)

    def build_recipe(self, cfg: TrainConfig) -> PaperRecipe:
        return build_recipe(cfg.recipe, cfg.fast, beta=cfg.beta)

    def build_objective(self, model: CMVAE, cfg: TrainConfig, recipe: PaperRecipe, loss_scale: float
                        ) -> CMVAEObjective:
        return CMVAEObjective(model, cfg.objective, cfg.n_samples, loss_scale, aux=recipe.aux_loss())

    def networks(self, model: CMVAE) -> Iterable[tuple[str, nn.Module]]:
        for kind, nets in (("encoder", model.encoders), ("decoder", model.decoders)):
            for i, net in enumerate(nets):
                yield f"{kind}[{i}]", net
        yield "encoders (grouped)", model.grouped_encoders  # the same parameters as encoder[i], one call

    def prepare(self, model: CMVAE, opts: StepOptions) -> None:
        model.decode_per_pair = opts.per_pair
        model.batch_encoders = opts.batch_encoders

    def compile_fullgraph(self, cfg: TrainConfig) -> bool:
        # DReG's weighting of the path gradient is an autograd Function (cmvae/path_weights.py), so the homogeneous
        # step is one graph; per-source caption decoders and the Modalities batch are allowed graph breaks.
        return not is_heterogeneous(cfg.model)

    def describe(self, cfg: TrainConfig, data_info: dict) -> str:
        m = cfg.model
        width = f"width {m.width:g}" + (" (REDUCED networks)" if m.reduced else " (reference)")
        return (f"{m.kind} on {data_info['name']} ({data_info['n']['train']} train tuples, M={m.n_modalities}), "
                f"{width}, K={m.n_clusters}, {cfg.objective} S={cfg.n_samples}, beta={cfg.beta}")

    def metrics_fields(self, cfg: TrainConfig) -> dict:
        return {"width": cfg.model.width, "reduced": cfg.model.reduced}

    @torch.no_grad()
    def evaluate(self, model: CMVAE, cfg: TrainConfig, splits: dict, device: torch.device,
                 progress: ProgressFn | None = None) -> dict:
        """Test bound per datapoint and clustering scores of the majority vote of argmax p(c|z_m)."""
        split = splits["test"]
        model.eval()
        g = torch.Generator(device=device)
        g.manual_seed(cfg.seed + 12345)
        total, n = torch.zeros((), device=device), split.images.shape[1]
        bs = max(cfg.optim.batch_size, 256)
        clustering = split.labels is not None and model.config.kind == "cmvae"
        n_batches = batches(n, bs)
        # the encoder pass of the clustering costs about a third of a bound batch (no decoders, no backward)
        work = 3 * n_batches + (n_batches if clustering else 0)
        for i, start in enumerate(range(0, n, bs)):
            x = to_float(split.images[:, start:start + bs].to(device))
            out = loss_fn(model, x, objective="iwae", n_samples=cfg.n_samples, beta=cfg.beta, generator=g)
            total += out.bound.sum()
            report(progress, 3 * (i + 1), work)
        result = {"test_bound": total.item() / n}  # sync point
        if clustering:
            lat = encode_split(model, split.images, batch_size=bs, generator=g, device=device,
                               progress=shifted(progress, 3 * n_batches, work))
            _, vote = assign_clusters(lat.resp)
            scores = clustering_scores(split.labels, vote.cpu().numpy())
            result.update({f"test_{k}": v for k, v in scores.items()})
        model.train()
        return result

    @torch.no_grad()
    def save_outputs(self, model: CMVAE, cfg: TrainConfig, splits: dict, out: Path, device: torch.device
                     ) -> list[str]:
        """recon.png: inputs and self-reconstructions of 8 test tuples; samples.png: rows = active clusters
        by prior mass (at most 16), columns = 4 samples of each modality."""
        split = splits["test"]
        model.eval()
        g = torch.Generator(device=device)
        g.manual_seed(cfg.seed)
        if isinstance(model, HeteroCMVAE):
            return self._save_hetero_outputs(model, cfg, split, out, g)
        x = to_float(split.images[:, :8].to(device))
        rec = model.reconstruct(x)
        rows = torch.stack([t for m in range(x.shape[0]) for t in (x[m], rec[m])])
        save_grid(out / "recon.png", rows)
        log_pi = model.prior_params()[0]
        order = [int(c) for c in torch.argsort(log_pi, descending=True) if torch.isfinite(log_pi[c])][:16]
        per_cluster = [model.generate(4, cluster=c, generator=g) for c in order]  # each [M, 4, C, H, W]
        grid = torch.stack([s.flatten(0, 1) for s in per_cluster])  # [rows, M*4, C, H, W]
        mass = log_pi.exp().tolist()
        save_grid(out / "samples.png", grid, row_labels=cluster_labels(order, mass),
                  title=f"before pruning: {len(order)} of {int(torch.isfinite(log_pi).sum())} clusters by prior mass; "
                        f"4 samples per modality")
        atomic_write_json(out / CLUSTERS, {"checkpoint": "checkpoint.pt", "prior_mass": mass, "order": order,
                                           "note": "the prior at the end of training, before pruning"})
        model.train()
        return ["recon.png", "samples.png", CLUSTERS]

    def _save_hetero_outputs(self, model: HeteroCMVAE, cfg: TrainConfig, split, out: Path, g: torch.Generator
                             ) -> list[str]:
        """The same files for images + captions: captions as text beside the image tiles (engine/hetero_outputs.py)."""
        from cmvae_engine.cmvae.data import resolve_dataset
        from cmvae_engine.engine.hetero_outputs import CaptionView, save_training_outputs

        view = CaptionView.for_data(model, resolve_dataset(cfg.data.dataset, data_root=cfg.data.data_root))
        log_pi = model.prior_params()[0]
        order = [int(c) for c in torch.argsort(log_pi, descending=True) if torch.isfinite(log_pi[c])][:16]
        mass = log_pi.exp().tolist()
        files = save_training_outputs(model, view, split.images, out, g, order, mass)
        atomic_write_json(out / CLUSTERS, {"checkpoint": "checkpoint.pt", "prior_mass": mass, "order": order,
                                           "note": "the prior at the end of training, before pruning"})
        model.train()
        return [*files, CLUSTERS]
