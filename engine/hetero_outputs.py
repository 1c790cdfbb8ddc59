"""Pictures of a heterogeneous model (images + captions): image tiles with the captions written as text beside them.

Image modalities of different sizes are shown at the largest size (nearest-neighbour) and in RGB; each caption
modality becomes words (token ids up to the end token, padding dropped)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cmvae_engine.cmvae.data.format import read_vocabs
from cmvae_engine.cmvae.evaluation.caption_naming import caption_words
from cmvae_engine.cmvae.hetero import HeteroCMVAE
from cmvae_engine.cmvae.modalities import Modalities


class CaptionView:
    """Turns a heterogeneous model's batches into image tiles and caption strings."""

    def __init__(self, model: HeteroCMVAE, vocabs: dict[int, list[str]]):
        self.specs = model.specs
        self.vocabs = vocabs
        self.image_ids = [m for m, s in enumerate(self.specs) if s["kind"] == "image"]
        self.text_ids = [m for m, s in enumerate(self.specs) if s["kind"] == "text"]
        self.size = max((self.specs[m]["size"] for m in self.image_ids), default=0)

    @classmethod
    def for_data(cls, model: HeteroCMVAE, root: str | Path) -> CaptionView:
        return cls(model, read_vocabs(root))

    def tile(self, x: torch.Tensor) -> torch.Tensor:
        """float images [N, C, H, W] in [0, 1] -> [N, 3, size, size]."""
        x = x.float()
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="nearest")
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def images(self, batch: Modalities) -> torch.Tensor:
        """[N, n_image_modalities, 3, size, size] (uint8 inputs are scaled to [0, 1])."""
        parts = [batch[m].float().div(255.0) if batch[m].dtype == torch.uint8 else batch[m] for m in self.image_ids]
        return torch.stack([self.tile(p.cpu()) for p in parts], dim=1)

    def captions(self, batch: Modalities) -> list[list[str]]:
        """Per text modality, one string per row."""
        out = []
        for m in self.text_ids:
            spec = self.specs[m]
            words = self.vocabs.get(m) or [str(i) for i in range(spec["vocab_size"])]
            out.append(caption_words(batch[m].cpu(), words, spec["pad_id"], spec["end_id"]))
        return out

    def row_texts(self, batch: Modalities, sep: str = " | ") -> list[str]:
        """One line per row: the row's captions (of every text modality), quoted."""
        caps = self.captions(batch)
        n = batch.shape[1]
        return [sep.join(f'"{c[i]}"' for c in caps) for i in range(n)]


@torch.no_grad()
def save_training_outputs(model: HeteroCMVAE, view: CaptionView, test: Modalities, out: Path,
                          generator: torch.Generator, order: list[int], mass: list[float]) -> list[str]:
    """recon.png (8 test tuples: inputs and self-reconstructions, captions in and out) and samples.png (rows =
    clusters by prior mass, 4 samples each: images and their captions)."""
    from cmvae_engine.cmvae.clustering import to_float
    from cmvae_engine.engine.images import cluster_labels, save_grid_with_text

    device = model.prior_logits.device
    x = to_float(test[:, :8].to(device))
    rec = model.reconstruct(x)
    grid = torch.cat([view.images(x), view.images(rec)], dim=1)
    texts = [f"{a}  ->  {b}" for a, b in zip(view.row_texts(x), view.row_texts(rec), strict=True)]
    save_grid_with_text(out / "recon.png", grid, texts,
                        title="inputs | self-reconstructions; captions: input -> reconstruction")
    rows, lines = [], []
    for c in order:
        s = model.generate(4, cluster=c, generator=generator)
        rows.append(view.images(s).flatten(0, 1))
        lines.append(" / ".join(view.row_texts(s)))
    save_grid_with_text(out / "samples.png", torch.stack(rows), lines, row_labels=cluster_labels(order, mass),
                        title=f"{len(order)} clusters by prior mass; 4 samples each (images, then their captions)")
    return ["recon.png", "samples.png"]


@torch.no_grad()
def generate_grids(model: HeteroCMVAE, view: CaptionView, test: Modalities, out: Path, g: torch.Generator,
                   order: list[int], mass: list[float], names: list[str], n: int, stage: str,
                   cluster: int | None = None) -> dict[str, dict]:
    """`cmvae-engine generate` for images + captions: unconditional.png (or cluster_{c}.png) and conditional_m{s}.png,
    captions as text right of the image tiles; the captions also go into the returned file entries."""
    from cmvae_engine.cmvae.clustering import to_float
    from cmvae_engine.engine.images import cluster_labels, save_grid_with_text

    files: dict[str, dict] = {}
    image_names = [names[m] for m in view.image_ids]
    rows = order if cluster is None else [cluster]
    tiles, lines, captions = [], [], {}
    for c in rows:
        s = model.generate(n, cluster=c, generator=g)
        tiles.append(view.images(s).flatten(0, 1))
        texts = view.row_texts(s)
        lines.append(" / ".join(texts))
        captions[str(c)] = texts
    name = "unconditional.png" if cluster is None else f"cluster_{cluster}.png"
    save_grid_with_text(out / name, torch.stack(tiles), lines, row_labels=cluster_labels(rows, mass),
                        title=f"{stage}: one row per cluster; {n} samples of {', '.join(image_names)}, then their "
                              "captions")
    files[name] = {"kind": "unconditional" if cluster is None else "cluster", "clusters": rows,
                   "caption": f"{stage}: one row per cluster (id and prior mass); {n} samples of each image modality "
                              f"({', '.join(image_names)}), the samples' captions as text on the right",
                   "captions": captions}
    if cluster is not None:
        return files
    x = to_float(test[:, :n].to(model.prior_logits.device))
    for src in range(len(names)):
        gen = model.generate_conditional(x[src], src, generator=g)
        grid = torch.cat([view.images(x), view.images(gen)], dim=1)
        texts = [f"{a}  ->  {b}" for a, b in zip(view.row_texts(x), view.row_texts(gen), strict=True)]
        fname = f"conditional_m{src}.png"
        save_grid_with_text(out / fname, grid, texts,
                            title=f"from {names[src]}: test inputs | generated; captions: input -> generated")
        files[fname] = {"kind": "conditional", "source": src,
                        "caption": f"rows: {n} test tuples; the input images, then the images generated from "
                                   f"{names[src]} (w from the prior); captions: input -> generated from {names[src]}",
                        "captions": texts}
    return files
