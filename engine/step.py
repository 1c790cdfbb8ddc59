"""The training step: forward (model + loss), backward, optimiser. Nothing in it reads a device value on the
host: the summed loss and the first non-finite step stay on the device until the loop reads them at a log
interval.

Speed options (each leaves the objective unchanged; the loss curve matches to a stated tolerance):
- AMP: the encoder and decoder networks run under autocast and hand fp32 tensors back, so sampling, the
  densities and the bound stay fp32 (bf16 by default; fp16 adds a GradScaler).
- channels_last weights and encoder inputs; cudnn.benchmark; fused Adam (the same amsgrad update).
- torch.compile of model + loss as one module (fullgraph, static shapes), optionally replayed as CUDA graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.model import CMVAE, Posterior
from cmvae_engine.cmvae.objectives import loss_fn
from cmvae_engine.engine.config import StepConfig

AMP_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepOptions:
    """StepConfig resolved for one device (the `None` = automatic choices made)."""

    amp_dtype: torch.dtype | None
    compile: bool
    cuda_graphs: bool
    channels_last: bool
    cudnn_benchmark: bool
    fused_adam: bool
    per_pair: bool

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.amp_dtype or torch.float32

    def describe(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}
        parts = [amp[self.amp_dtype], "compiled" + (" + CUDA graphs" if self.cuda_graphs else "") if self.compile
                 else "eager", "channels_last" if self.channels_last else "NCHW",
                 "fused Adam" if self.fused_adam else "Adam", "per-pair decoders" if self.per_pair
                 else "batched decoders"]
        return ", ".join(parts)


def resolve_options(cfg: StepConfig, device: torch.device) -> StepOptions:
    cuda = device.type == "cuda"
    if cfg.cuda_graphs and not cuda:
        raise ValueError("--cuda-graphs needs a CUDA device; drop it on CPU")
    amp = cuda if cfg.amp is None else cfg.amp
    return StepOptions(
        amp_dtype=AMP_DTYPE[cfg.amp_dtype] if amp else None,
        compile=cfg.compile,
        cuda_graphs=cfg.cuda_graphs,
        channels_last=cuda if cfg.channels_last is None else cfg.channels_last,
        cudnn_benchmark=cfg.cudnn_benchmark and cuda,
        fused_adam=cuda if cfg.fused_adam is None else cfg.fused_adam,
        per_pair=cfg.decode_per_pair,
    )


def _wrapped_forward(forward: Callable, name: str, device_type: str, opts: StepOptions, annotate: bool) -> Callable:
    amp_dtype, channels_last = opts.amp_dtype, opts.channels_last

    def run(x: torch.Tensor):
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = record_function(name) if annotate else contextlib.nullcontext()
        with ctx, torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = forward(x)
        if amp_dtype is None:
            return out
        # fp32 back to the probabilistic core: a bf16 Laplace sampler would clamp u at eps 2^-7 (truncating the
        # tails) and a bf16 bound near 1e4 nats would be resolved to 64 nats.
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    return run


def _nearest_by_expand(scale: int) -> Callable:
    def upsample(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(n, c, h, scale, w, scale).reshape(n, c, h * scale, w * scale)

    return upsample


def _patch_upsampling(model: nn.Module, compiled: bool) -> None:
    """Under torch.compile, nearest upsampling as expand + reshape (the same values; its backward is a sum).

    torch 2.13's inductor on CPU decomposes the backward of upsample_nearest2d into an accumulating index_put and
    schedules a consumer of that buffer before the index_put (checked: zero gradients for the decoder's first
    residual blocks at 96 rows, correct at 16). The expand form has no index_put.
    """
    for mod in model.modules():
        if isinstance(mod, nn.Upsample):
            mod.__dict__.pop("forward", None)
            scale = mod.scale_factor
            if compiled and mod.mode == "nearest" and isinstance(scale, (int, float)) and float(scale).is_integer():
                mod.forward = _nearest_by_expand(int(scale))


def prepare_model(model: CMVAE, opts: StepOptions, device: torch.device, annotate: bool = False) -> CMVAE:
    """Apply layout, autocast and profiler ranges to the encoder and decoder networks in place.

    The wrappers live in each network's instance `forward` (not in the module tree), so state_dict keys and
    checkpoints are those of the plain model.
    """
    model.decode_per_pair = opts.per_pair
    _patch_upsampling(model, opts.compile)
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    for kind, nets in (("encoder", model.encoders), ("decoder", model.decoders)):
        for i, net in enumerate(nets):
            net.__dict__.pop("forward", None)
            if opts.amp_dtype is not None or opts.channels_last or annotate:
                net.forward = _wrapped_forward(type(net).forward.__get__(net), f"{kind}[{i}]", device.type, opts,
                                               annotate)
    return model


class LossModule(nn.Module):
    """The model and its objective as one forward, so that DDP and torch.compile see the whole step.

    forward(uint8 images [M, B, C, H, W], beta tensor) -> (loss to minimise x loss_scale, summed bound).
    loss_scale = world size under DDP: the loss is a SUM over the batch and DDP averages gradients over ranks,
    so scaling restores the single-process gradient of the global batch.
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

    def forward(self, xb: torch.Tensor, beta: torch.Tensor, aux_weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        out = loss_fn(self.model, to_float(xb), objective=self.objective, n_samples=self.n_samples, beta=beta)
        loss = out.loss
        if self.aux is not None and aux_weight is not None:
            loss = loss + aux_weight * self.aux(out.posterior)
        loss = loss * self.loss_scale if self.loss_scale != 1.0 else loss
        return loss, out.bound.sum()


def build_optimizer(param_groups: list[dict], lr: float, amsgrad: bool, opts: StepOptions) -> torch.optim.Adam:
    # fused=None keeps torch's default (foreach); fused=True is one kernel for all parameters.
    return torch.optim.Adam(param_groups, lr=lr, amsgrad=amsgrad, fused=True if opts.fused_adam else None)


class StepStats:
    """Device-side accumulators: summed loss, tuples and the first step whose loss was not finite (-1: none)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.n = 0

    def add(self, bound_sum: torch.Tensor, batch: int, step: int) -> None:
        loss = -bound_sum.detach().double()
        self.loss += loss
        self.n += batch
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def reset(self) -> None:
        self.loss.zero_()
        self.n = 0


class TrainStep:
    """One optimiser step on a uint8 batch; call it, then read `stats` at log intervals only."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, opts: StepOptions,
                 device: torch.device, *, fullgraph: bool = True, annotate: bool = False):
        self.optimizer = optimizer
        self.opts = opts
        self.device = device
        self.annotate = annotate
        if opts.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        self.forward = module
        if opts.compile:
            mode = "reduce-overhead" if opts.cuda_graphs else None
            self.forward = torch.compile(module, fullgraph=fullgraph, dynamic=False, mode=mode)
        # The loss is a SUM over pixels and modalities: the gradients reaching the encoders' heads are large
        # already, and torch's default initial scale 2^16 overflows fp16 at every step (checked at width 0.0625:
        # still overflowing at 2^7; no overflow at 1). The scaler still halves on overflow and doubles after
        # 2000 clean steps.
        self.scaler = torch.amp.GradScaler(device.type, init_scale=1.0) if opts.amp_dtype == torch.float16 \
            else None
        self.beta = torch.zeros((), device=device)
        self.aux_weight = torch.zeros((), device=device)
        self.stats = StepStats(device)

    def _range(self, name: str):
        return record_function(name) if self.annotate else contextlib.nullcontext()

    def __call__(self, xb: torch.Tensor, beta: float, step: int, aux_weight: float = 0.0) -> None:
        """xb uint8 [M, B, C, H, W] on the device; `step` is the 1-based number of this step (for stats);
        aux_weight weighs the recipe's extra term (if the LossModule has one)."""
        self.beta.fill_(beta)  # a device tensor: a changing beta neither syncs nor recompiles
        if self.opts.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self._range("forward"):
            self.aux_weight.fill_(aux_weight)  # like beta: a device tensor (LossModule ignores it without a term)
            loss, bound_sum = self.forward(xb, self.beta, self.aux_weight)
        self.optimizer.zero_grad(set_to_none=True)
        with self._range("backward"):
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        with self._range("optimizer"):
            if self.scaler:
                # With fused Adam (the CUDA default) the scale and the inf flag stay on the device; a non-fused
                # optimizer makes GradScaler read the flag on the host (one sync per step, fp16 only).
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.stats.add(bound_sum, xb.shape[1], step)
