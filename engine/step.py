"""The training step: forward (model + loss), backward, optimiser. Nothing in it reads a device value on the
host: the summed loss and the first non-finite step stay on the device until the loop reads them at a log
interval. It knows no model: the objective module comes from the task (engine/tasks/), the step scalars from
the recipe.

Speed options (each leaves the objective unchanged; the loss curve matches to a stated tolerance):
- AMP: the encoder and decoder networks run under autocast and hand fp32 tensors back, so sampling, the
  densities and the bound stay fp32 (bf16 by default; fp16 adds a GradScaler). Unset, it is on for CUDA and for
  CPUs that multiply bf16 matrices in hardware (AMX tiles), off on other CPUs (`auto_amp`).
- channels_last weights and encoder inputs; cudnn.benchmark; fused Adam (the same amsgrad update).
- torch.compile of model + loss as one module (fullgraph, static shapes), optionally replayed as CUDA graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

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
    batch_encoders: bool = False

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.amp_dtype or torch.float32

    @property
    def compute_dtype_name(self) -> str:
        """`float32`, `bfloat16` or `float16`: as the benchmark JSONs and reports write it."""
        return str(self.compute_dtype).removeprefix("torch.")

    def describe(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}
        parts = [amp[self.amp_dtype], "compiled" + (" + CUDA graphs" if self.cuda_graphs else "") if self.compile
                 else "eager", "channels_last" if self.channels_last else "NCHW",
                 "fused Adam" if self.fused_adam else "Adam", "per-pair decoders" if self.per_pair
                 else "batched decoders"]
        parts.append("grouped encoders" if self.batch_encoders else "per-tower encoders")
        return ", ".join(parts)


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX tiles, as oneDNN sees them)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.13; absent: assume none
    return bool(probe is not None and probe())


def auto_amp(device: torch.device, amp_dtype: torch.dtype) -> bool:
    """The `--amp` default. On CPU, bf16 autocast only where AMX runs it: there the step ran 2.26x
    (width 0.5) down to 1.18x (width 0.0625) faster than fp32 on a 2-core AMX Xeon; on a 2-core AMD EPYC without
    AMX the bf16 step ran 1.8x slower than fp32 (width 0.0625; docs/step_cpu.md). fp16 on CPU stays opt-in."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and amp_dtype == torch.bfloat16 and cpu_has_bf16_matrix_units()


def resolve_options(cfg: StepConfig, device: torch.device) -> StepOptions:
    cuda = device.type == "cuda"
    if cfg.cuda_graphs and not cuda:
        raise ValueError("--cuda-graphs needs a CUDA device; drop it on CPU")
    amp = auto_amp(device, AMP_DTYPE[cfg.amp_dtype]) if cfg.amp is None else cfg.amp
    return StepOptions(
        amp_dtype=AMP_DTYPE[cfg.amp_dtype] if amp else None,
        compile=cfg.compile,
        cuda_graphs=cfg.cuda_graphs,
        # On CPU too: oneDNN's NHWC convolutions skip the per-call reorders (measured faster, docs/step_cpu.md).
        channels_last=True if cfg.channels_last is None else cfg.channels_last,
        cudnn_benchmark=cfg.cudnn_benchmark and cuda,
        fused_adam=cuda if cfg.fused_adam is None else cfg.fused_adam,
        # Per device: on CPU the reference's M*M decoder calls and 2M tower calls beat one big batch or grouped
        # convolutions (cache-sized activations; docs/step_cpu.md); on CUDA fewer, larger launches win.
        per_pair=not cuda if cfg.decode_per_pair is None else cfg.decode_per_pair,
        batch_encoders=cuda if cfg.batch_encoders is None else cfg.batch_encoders,
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


def prepare_model(model: nn.Module, networks: Iterable[tuple[str, nn.Module]], opts: StepOptions,
                  device: torch.device, annotate: bool = False) -> nn.Module:
    """Apply layout, autocast and profiler ranges to the model's networks in place.

    The wrappers live in each network's instance `forward` (not in the module tree), so state_dict keys and
    checkpoints are those of the plain model.
    """
    _patch_upsampling(model, opts.compile)
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    for name, net in networks:
        net.__dict__.pop("forward", None)
        if opts.amp_dtype is not None or opts.channels_last or annotate:
            net.forward = _wrapped_forward(type(net).forward.__get__(net), name, device.type, opts, annotate)
    return model


def build_optimizer(param_groups: list[dict], lr: float, amsgrad: bool, opts: StepOptions) -> torch.optim.Adam:
    # fused=None keeps torch's default (foreach); fused=True is one kernel for all parameters.
    return torch.optim.Adam(param_groups, lr=lr, amsgrad=amsgrad, fused=True if opts.fused_adam else None)


Batch = torch.Tensor | Sequence[torch.Tensor]
"""What a loader yields and the objective takes: one tensor with a leading modality axis [M, B, ...], or one
tensor per modality [B, ...] (modalities of different shapes)."""


def batch_size_of(xb: Batch) -> int:
    return int(xb.shape[1]) if isinstance(xb, torch.Tensor) else int(xb[0].shape[0])


class StepStats:
    """Device-side accumulators: the summed reported loss, datapoints and the first step whose loss was not finite
    (-1: none)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.n = 0

    def add(self, loss_sum: torch.Tensor, batch: int, step: int) -> None:
        loss = loss_sum.detach().double()
        self.loss += loss
        self.n += batch
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def reset(self) -> None:
        self.loss.zero_()
        self.n = 0


class TrainStep:
    """One optimiser step on a batch; call it, then read `stats` at log intervals only.

    `module` is the task's objective: forward(batch, scalars) -> (loss to minimise, batch sum of the reported
    loss). `grad_clip` clips the global gradient norm before the update (None: no clipping, the reference).
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, opts: StepOptions,
                 device: torch.device, *, fullgraph: bool = True, annotate: bool = False,
                 grad_clip: float | None = None):
        self.optimizer = optimizer
        self.opts = opts
        self.device = device
        self.annotate = annotate
        self.grad_clip = grad_clip
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
        self.scalars: dict[str, torch.Tensor] = {}
        """The recipe's step scalars as device tensors, refilled in place every step."""
        self.stats = StepStats(device)

    def _range(self, name: str):
        return record_function(name) if self.annotate else contextlib.nullcontext()

    def _fill(self, values: Mapping[str, float | Sequence[float]]) -> dict[str, torch.Tensor]:
        """Write the step's values into persistent device tensors: filling in place neither syncs the host nor
        changes what a compiled graph or a CUDA graph reads."""
        if not self.scalars:
            self.scalars = {k: torch.zeros(() if isinstance(v, (int, float)) else (len(v),), device=self.device)
                            for k, v in values.items()}
        elif values.keys() != self.scalars.keys():
            raise ValueError(f"the recipe's step scalars changed from {sorted(self.scalars)} to {sorted(values)}")
        for k, v in values.items():
            t = self.scalars[k]
            if t.dim() == 0:
                t.fill_(v)
            else:
                for i, x in enumerate(v):
                    t[i].fill_(x)
        return self.scalars

    def __call__(self, xb: Batch, step: int, scalars: Mapping[str, float | Sequence[float]] | None = None) -> None:
        """xb on the device; `step` is the 1-based number of this step (for stats); `scalars` the recipe's
        values for it (recipe.scalars(step - 1))."""
        tensors = self._fill(scalars or {})
        if self.opts.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self._range("forward"):
            loss, loss_sum = self.forward(xb, tensors)
        self.optimizer.zero_grad(set_to_none=True)
        with self._range("backward"):
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        with self._range("optimizer"):
            if self.grad_clip is not None:
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)  # no host sync (error_if_nonfinite off)
            if self.scaler:
                # With fused Adam (the CUDA default) the scale and the inf flag stay on the device; a non-fused
                # optimizer makes GradScaler read the flag on the host (one sync per step, fp16 only).
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.stats.add(loss_sum, batch_size_of(xb), step)
