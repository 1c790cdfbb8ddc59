"""D-CMVAE's diffusion stage as a training task: the denoisers train through the same loop as the CMVAE (its
checkpoints, exact resume, signals, --amp, --compile, --nproc, metrics.jsonl and loaders), on top of a frozen
CMVAE whose reconstructions are made on the fly for every batch (cmvae/diffusion/conditioning.py).

The objective is the DDPM epsilon loss averaged over pixels, datapoints and modalities (a mean, as DDPM, so Adam's
step and the gradient clip see the usual scale); DDP's gradient averaging then yields the global mean, so the loss
is not multiplied by the world size as the CMVAE's summed bound is. The recipe warms the learning rate up linearly
and updates the EMA weights after every step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.diffusion.config import DiffusionConfig
from cmvae_engine.cmvae.diffusion.generation import generate
from cmvae_engine.cmvae.diffusion.model import DCMVAE
from cmvae_engine.cmvae.generation import cluster_order
from cmvae_engine.cmvae.progress import ProgressFn, report
from cmvae_engine.engine.checkpoint import load_checkpoint
from cmvae_engine.engine.config import TrainConfig
from cmvae_engine.engine.images import save_grid
from cmvae_engine.engine.recipes import Recipe, StepContext
from cmvae_engine.engine.step import resolve_options
from cmvae_engine.engine.tasks.base import Task

EVAL_TUPLES = 256
"""Test tuples of the epoch-end evaluation (a fixed subset and fixed noise: the rows are comparable)."""


class DiffusionObjective(nn.Module):
    """forward(uint8 [M, B, C, H, W], scalars) -> (mean epsilon loss, batch sum of the per-datapoint loss)."""

    def __init__(self, model: DCMVAE, amp_dtype: torch.dtype | None):
        """amp_dtype: the resolved step options' (StepOptions.amp_dtype; None: no autocast)."""
        super().__init__()
        self.model, self.amp_dtype = model, amp_dtype

    def forward(self, xb: torch.Tensor, scalars: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # autocast reaches the denoisers only: x_hat is made under no_grad in fp32, the loss is taken in fp32
        with torch.autocast(xb.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            per = self.model.losses(to_float(xb))  # [M, B]
        per_datapoint = per.float().mean(0)
        return per_datapoint.mean(), per_datapoint.sum().detach()


class DiffusionRecipe(Recipe):
    """Linear learning-rate warm-up over `warmup` steps, then constant; an EMA update after every step."""

    name = "diffusion"

    def __init__(self, warmup: int, lr: float):
        self.warmup, self.lr = warmup, lr

    def lr_at(self, step: int) -> float:
        """The learning rate of the 1-based step `step`."""
        return self.lr * min(1.0, step / self.warmup)

    def param_groups(self, model: DCMVAE, lr: float) -> list[dict]:
        return [{"params": [p for p in model.denoisers.parameters()], "lr": self.lr_at(1)}]

    def after_step(self, ctx: StepContext) -> None:
        ctx.model.update_ema()
        for group in ctx.optimizer.param_groups:
            group["lr"] = self.lr_at(ctx.step + 1)


def load_cmvae_weights(model: DCMVAE, path: str | Path) -> None:
    """The trained CMVAE's weights (a train or prune checkpoint) into the frozen CMVAE."""
    payload = load_checkpoint(path)
    model.cmvae.load_state_dict(payload["model"], strict=True)


class DiffusionTask(Task):
    kind = "dcmvae"

    def adapt_config(self, cfg: TrainConfig, data_info: dict) -> None:
        """The data must be the CMVAE's: as many modalities, the same channel count."""
        m: DiffusionConfig = cfg.model
        cm = m.cmvae
        shapes = [tuple(s) for s in data_info["image_shapes"]]
        if len(shapes) != cm.get("n_modalities") or any(c != cm.get("image_channels", 3) for c, _, _ in shapes):
            raise DataError(f"holds {len(shapes)} modalities of {sorted({s[0] for s in shapes})} channels; the "
                            f"CMVAE under the diffusion stage was trained on {cm.get('n_modalities')} modalities "
                            f"of {cm.get('image_channels', 3)} channels", path=Path(data_info["root"]),
                            fix="train the diffusion stage on the CMVAE run's own data set (the default)")
        m.n_modalities = cm["n_modalities"]
        m.image_channels = cm.get("image_channels", 3)

    def build_model(self, cfg: TrainConfig) -> DCMVAE:
        model = DCMVAE(cfg.model)
        ckpt = cfg.model.cmvae_checkpoint
        # A fresh run takes the CMVAE from its checkpoint; a resumed or reloaded run then overwrites every weight
        # from its own checkpoint (which holds the CMVAE too), so a moved CMVAE run folder does not matter there.
        if ckpt and Path(ckpt).is_file():
            load_cmvae_weights(model, ckpt)
        return model

    def build_recipe(self, cfg: TrainConfig) -> DiffusionRecipe:
        return DiffusionRecipe(cfg.model.warmup_steps, cfg.optim.lr)

    def build_objective(self, model: DCMVAE, cfg: TrainConfig, recipe: Recipe, loss_scale: float
                        ) -> DiffusionObjective:
        del recipe, loss_scale  # a mean loss: see the module docstring
        opts = resolve_options(cfg.step, next(model.parameters()).device)  # as the trainer resolved them
        return DiffusionObjective(model, opts.amp_dtype)

    def compile_fullgraph(self, cfg: TrainConfig) -> bool:
        return False

    def describe(self, cfg: TrainConfig, data_info: dict) -> str:
        m = cfg.model
        size = f"base {m.base}" + (" (REDUCED denoiser)" if m.reduced else " (paper)")
        return (f"D-CMVAE diffusion stage on {data_info['name']}: {m.n_modalities} UNet denoisers, {size}, T="
                f"{m.timesteps}, on the frozen CMVAE of {m.cmvae_checkpoint}")

    def metrics_fields(self, cfg: TrainConfig) -> dict:
        return {"base": cfg.model.base, "reduced": cfg.model.reduced}

    @torch.no_grad()
    def evaluate(self, model: DCMVAE, cfg: TrainConfig, splits: dict, device: torch.device,
                 progress: ProgressFn | None = None) -> dict:
        """The epsilon loss of the EMA denoisers on a fixed test subset with fixed noise."""
        x = to_float(splits["test"].images[:, :EVAL_TUPLES].to(device))
        g = torch.Generator(device=device)
        g.manual_seed(cfg.seed + 12345)
        model.eval()
        total, n, bs = 0.0, x.shape[1], 128
        for i, start in enumerate(range(0, n, bs)):
            total += float(model.losses(x[:, start:start + bs], generator=g, nets=model.ema).mean(0).sum())
            report(progress, i + 1, -(-n // bs))
        model.train()
        return {"test_eps_loss_ema": total / n}

    @torch.no_grad()
    def save_outputs(self, model: DCMVAE, cfg: TrainConfig, splits: dict, out: Path, device: torch.device
                     ) -> list[str]:
        """samples.png: for each modality a row of CMVAE samples and below it the same samples denoised (DDIM,
        25 steps, EMA weights); 8 columns, clusters by prior mass."""
        model.eval()
        g = torch.Generator(device=device)
        g.manual_seed(cfg.seed)
        order = cluster_order(model.cmvae)
        rows, labels = [], []
        x_hat, refined = generate(model, 8, generator=g, steps=min(25, model.config.timesteps))
        for m in range(model.n_modalities):
            rows += [x_hat[m], refined[m]]
            labels += [f"m{m} CMVAE", f"m{m} D-CMVAE"]
        save_grid(out / "samples.png", torch.stack(rows), row_labels=labels,
                  title=f"unconditional: CMVAE samples and the same denoised (DDIM 25 steps); {len(order)} "
                        "active clusters")
        model.train()
        return ["samples.png"]
