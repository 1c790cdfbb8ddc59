"""Data-parallel training with torch.distributed: one process per device, launched by torchrun.

`cmvae-engine train ... --nproc N` re-launches itself through torch.distributed.run (`launch`); running
`torchrun --standalone --nproc-per-node N --no-python cmvae-engine train ...` directly does the same. Each
process trains a DDP replica on its 1/N of every global batch (`--batch-size` stays the GLOBAL batch). Rank 0
alone resolves or synthesises the data set, writes files and evaluates; gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank and world size from the torchrun environment (a single process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group of a torchrun launch (no-op for one process)."""
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                                device_id=device if device.type == "cuda" else None)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP around the loss module; buffers (the pruning mask) never change in training, so none are broadcast."""
    if not info.enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the switch (the old name warns); 2.11 has only the old one.
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else "broadcast_buffers"
    return ddp(module, device_ids=ids, **{no_sync: False})


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of t over ranks (t itself for one process). A collective: call it on every rank at the same point."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_min(t: torch.Tensor) -> torch.Tensor:
    """Minimum of t over ranks (t itself for one process). A collective."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_FINGERPRINT_SEED = 0x5EED


def fingerprints(module: nn.Module) -> tuple[list[str], torch.Tensor]:
    """(names, one int64 fingerprint per parameter and buffer [T]) on the module's device.

    A fingerprint hashes a tensor's exact bits: sum_i bits_i * r_i over the elements (wrapping int64
    arithmetic), with r fixed pseudo-random weights that are the same on every rank. Any change of any element
    (one ulp, two values swapped, changes that cancel in a plain sum) changes it, but for a 2^-64 chance."""
    named = [(n, t) for n, t in module.named_parameters()] + [(n, t) for n, t in module.named_buffers()]
    g = torch.Generator(device="cpu").manual_seed(_FINGERPRINT_SEED)
    prints = []
    for _, t in named:
        flat = t.detach().contiguous().reshape(-1)
        bits = flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.dtype != torch.bool else flat.to(torch.int8)
        weights = torch.randint(-2 ** 62, 2 ** 62, (flat.numel(),), generator=g).to(flat.device)
        prints.append((bits.to(torch.int64) * weights).sum())
    names = [n.removeprefix("module.") for n, _ in named]
    device = named[0][1].device if named else torch.device("cpu")
    return names, torch.stack(prints) if prints else torch.zeros(0, dtype=torch.int64, device=device)


def check_replicas(module: nn.Module, step: int) -> None:
    """Raise if any parameter or buffer differs between the ranks (a broken gradient synchronisation), naming
    the first that differs and the ranks that disagree with rank 0; a collective.

    Every tensor is compared exactly, through its fingerprint (`fingerprints`): all ranks' fingerprints are
    gathered, one int64 per tensor."""
    if not dist.is_initialized():
        return
    names, mine = fingerprints(module)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    table = torch.stack(gathered).cpu()  # sync point: [ranks, tensors]
    differs = (table != table[0]).any(0)
    if bool(differs.any()):
        first = int(differs.nonzero()[0])
        ranks = [r for r in range(table.shape[0]) if table[r, first] != table[0, first]]
        count = int(differs.sum())
        raise RuntimeError(f"data-parallel replicas hold different parameters at step {step}: {names[first]!r} "
                           f"differs between rank 0 and rank(s) {ranks}"
                           + (f" ({count - 1} more tensor(s) differ)" if count > 1 else "")
                           + ": the gradient synchronisation is broken")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if flag is true on any (used to agree on stopping after a signal)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)  # sync point


def broadcast_object(obj, info: DistInfo):
    """Rank 0's Python object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(cfg_dict: dict, nproc: int) -> tuple[int, int | None, dict]:
    """Run training in `nproc` processes through torch.distributed.run.

    Returns the launcher's exit code, the signal passed on to it (None if none) and how rank 0's training ended
    (`_worker` writes it): {"metrics": last row}, {"stopped": signum, "step", "checkpoint"} or {"error": message,
    "kind": "bad_input" | "failed"}; {} when no rank reported. The launcher's own exit code says little: it is
    non-zero after a signal even when the workers stopped cleanly with a checkpoint.

    The config travels as a JSON file, so the workers train exactly what this process parsed.
    """
    with tempfile.TemporaryDirectory(prefix="cmvae-launch-") as tmp:
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(cfg_dict))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "cmvae_engine.engine.distributed", str(cfg_path)]
        proc = subprocess.Popen(cmd)
        received: list[int] = []

        def forward(signum: int, frame) -> None:
            received.append(signum)
            if signum != signal.SIGINT:  # Ctrl-C reaches the launcher and workers directly (one process group)
                proc.send_signal(signum)  # the launcher forwards it to the workers, which checkpoint and stop

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = proc.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        results = sorted(Path(tmp).glob("result-*.json"), key=lambda p: int(p.stem.split("-")[1]))
        result = json.loads(results[0].read_text()) if results else {}
        if results and "error" not in result:  # a rank that failed says more than rank 0's clean stop
            errors = [r for r in (json.loads(p.read_text()) for p in results[1:]) if "error" in r]
            result = errors[0] if errors else result
        return rc, (received[0] if received else None), result


def _worker(cfg_path: str) -> None:
    """One data-parallel process: trains, then writes how it ended next to the config for `launch` to read."""
    from cmvae_engine.engine.config import TrainConfig
    from cmvae_engine.engine.signals import EXIT_BAD_INPUT, EXIT_FAILED, Stopped
    from cmvae_engine.engine.trainer import train

    result_path = Path(cfg_path).with_name(f"result-{env_info().rank}.json")
    try:
        metrics = train(TrainConfig.from_dict(json.loads(Path(cfg_path).read_text())))
    except Stopped as e:  # a clean stop: exit 0 so that the launcher reports no failure; `launch` says stopped
        result_path.write_text(json.dumps({"stopped": e.signum, "step": e.step, "checkpoint": str(e.checkpoint),
                                           "metrics": e.metrics}))
        return
    except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError) as e:
        bad_input = isinstance(e, ValueError | FileNotFoundError)
        result_path.write_text(json.dumps({"error": str(e), "kind": "bad_input" if bad_input else "failed"}))
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT if bad_input else EXIT_FAILED)
    result_path.write_text(json.dumps({"metrics": metrics}))


if __name__ == "__main__":
    _worker(sys.argv[1])
