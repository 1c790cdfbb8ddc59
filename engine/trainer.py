"""The training loop, the one every model family trains through. The step itself (engine/step.py) is data ->
forward -> backward -> optimiser; logging, evaluation, checkpoints (engine/resume.py), graceful stops
(engine/signals.py) and outputs hang off this outer loop. What depends on the model family (the model, its
objective, recipe, evaluation and outputs) comes from its task (engine/tasks/). The loss is read on the host only
at log intervals and before checkpoints."""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from cmvae_engine import kernels
from cmvae_engine.cmvae.data import MultimodalDataset, read_dataset, resolve_dataset
from cmvae_engine.cmvae.data.format import constant_images, fingerprint, modality_info
from cmvae_engine.engine import distributed, resume
from cmvae_engine.engine.checkpoint import atomic_write_json
from cmvae_engine.engine.config import TrainConfig
from cmvae_engine.engine.cost import PROBE_STEPS, cost_warning, project
from cmvae_engine.engine.distributed import DistInfo
from cmvae_engine.engine.loaders import Loader, make_loader, stack_modalities
from cmvae_engine.engine.logsinks import Sinks, open_sinks
from cmvae_engine.engine.progress import Board, epoch_line, format_duration
from cmvae_engine.engine.recipes import Recipe, StepContext
from cmvae_engine.engine.run_info import record_training_start
from cmvae_engine.engine.signals import StopFlag, Stopped
from cmvae_engine.engine.step import StepOptions, TrainStep, build_optimizer, prepare_model, resolve_options
from cmvae_engine.engine.tasks import Task, task_for
from cmvae_engine.engine.warm_start import WarmStartContext


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device. Fix: pass auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda devices are supported. Fix: pass auto, cpu, cuda or "
                         "cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine. Fix: use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # one device per data-parallel process
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s). Fix: pass "
                         f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return dev


@dataclass
class SplitData:
    images: torch.Tensor | None   # uint8 [M, N, C, H, W]; None for a streamed training split
    labels: np.ndarray | None


def resolve_with_progress(dataset: str, data_root: str | None, console: Console | None) -> Path:
    """resolve_dataset with a progress bar when the data set has to be made first (synthesised, converted)."""
    if console is None:
        return resolve_dataset(dataset, data_root=data_root)
    with Board(console) as board, board.phase(f"data set {dataset}: preparing it (first use)", lazy=True) as bar:
        root = resolve_dataset(dataset, data_root=data_root, progress=bar)
    if bar.done:
        console.print(f"data set {dataset} written to {root}", markup=False, highlight=False)
    return root


def read_data(cfg: TrainConfig, info: DistInfo = DistInfo(), mmap: bool = False, console: Console | None = None
              ) -> tuple[MultimodalDataset, dict]:
    """Resolve and read (validating) the data set: rank 0 resolves or synthesises it first (with a progress bar
    on `console`), the others wait and then read it. Returns the data set and what the run records of it
    (config.json, checkpoints)."""
    if info.is_main:
        root = resolve_with_progress(cfg.data.dataset, cfg.data.data_root, console)
    distributed.barrier()
    if not info.is_main:
        root = resolve_dataset(cfg.data.dataset, data_root=cfg.data.data_root)
    ds = read_dataset(root, mmap=mmap)
    meta = {"root": str(Path(root).absolute()), "name": ds.name, "modalities": ds.modality_names,
            "n": {k: s.n for k, s in ds.splits.items()},
            "image_shapes": [list(shape) for shape in ds.splits["train"].image_shapes],
            "fingerprint": fingerprint(ds), "modality_info": modality_info(ds)}
    return ds, meta


def stack_splits(ds: MultimodalDataset, stack_train: bool = True) -> dict[str, SplitData]:
    return {name: SplitData(stack_modalities(s.modalities) if stack_train or name != "train" else None, s.labels)
            for name, s in ds.splits.items()}


def load_splits(cfg: TrainConfig, info: DistInfo = DistInfo(), stack_train: bool = True,
                console: Console | None = None) -> tuple[dict[str, SplitData], dict]:
    """Read the data set and stack its splits (the training split only for resident loaders)."""
    ds, meta = read_data(cfg, info, mmap=not stack_train, console=console)
    return stack_splits(ds, stack_train), meta


def preflight(cfg: TrainConfig) -> list[str]:
    """Every check that needs no model: the run folder, the data set and the model's fit to it (on a copy of
    cfg). Returns the data warnings. `train` runs it before launching data-parallel processes."""
    resume.check_out_folder(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    ds, meta = read_data(cfg, mmap=True)
    task_for(cfg.model.kind).adapt_config(copy.deepcopy(cfg), meta)
    return constant_images(ds)


def data_stream(loader: Loader, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
    """loader.epoch(...) with the host RNG untouched: a DataLoader draws its base seed from torch's global
    generator when an epoch starts, which would shift the sampling noise (CPU training) and make a resumed run
    differ from an uninterrupted one."""
    it = loader.epoch(epoch, start_batch)
    while True:
        with torch.random.fork_rng(devices=[]):
            xb = next(it, None)
        if xb is None:
            return
        yield xb


@dataclass
class Engine:
    """Everything the loop, the profiler and the benchmark drive: model, optimiser, step, loader, data."""

    cfg: TrainConfig
    device: torch.device
    info: DistInfo
    task: Task
    """The model family's side of the seam (engine/tasks/)."""
    model: nn.Module
    """The plain model (no compile/DDP wrapper): what checkpoints store and evaluation uses."""
    optimizer: torch.optim.Optimizer
    recipe: Recipe
    step: TrainStep
    loader: Loader
    opts: StepOptions
    splits: dict[str, SplitData]
    data_info: dict
    notes: list[str]
    """Things the user must be told on screen (dropped batches, fallbacks)."""
    warnings: list[str] = field(default_factory=list)
    """Problems of the data that do not stop training (e.g. a modality whose images are all one value)."""

    @property
    def train_images(self) -> torch.Tensor | None:
        """uint8 training split on the device, for recipes (None for streaming loaders)."""
        return getattr(self.loader, "images", None)


def build_engine(cfg: TrainConfig, info: DistInfo = DistInfo(), device: torch.device | None = None,
                 annotate: bool = False, console: Console | None = None) -> Engine:
    """Data, model, optimiser, compiled/AMP step and loader as configured (`annotate`: profiler ranges;
    `console`: where a data set being made shows its progress)."""
    device = device or resolve_device(cfg.device, info.local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    kernels.set_backend(cfg.kernels)
    torch.manual_seed(cfg.seed)  # the same initial parameters on every rank
    resident = cfg.data.loader == "resident"
    if console is not None:
        console.print(f"preparing: data set {cfg.data.dataset}, model, optimiser and step on {device} ...",
                      markup=False, highlight=False, style="dim")
    ds, data_info = read_data(cfg, info, mmap=not resident, console=console)
    task = task_for(cfg.model.kind)
    task.adapt_config(cfg, data_info)  # refuses data the model cannot take, before anything is stacked
    warnings = constant_images(ds) if info.is_main else []
    splits = stack_splits(ds, stack_train=resident)
    del ds
    model = task.build_model(cfg).to(device)
    if info.enabled:
        torch.manual_seed(cfg.seed + 7919 * info.rank)  # independent sampling noise per rank
    opts = resolve_options(cfg.step, device)
    task.prepare(model, opts)
    # no profiler ranges inside a compiled graph
    prepare_model(model, task.networks(model), opts, device, annotate=annotate and not opts.compile)
    recipe = task.build_recipe(cfg)
    optimizer = build_optimizer(recipe.param_groups(model, cfg.optim.lr), cfg.optim.lr, cfg.optim.amsgrad, opts)
    # The loss is a sum over the batch; DDP averages gradients: scale by the world size to get the global sum.
    module = distributed.wrap(task.build_objective(model, cfg, recipe, float(info.world_size)), info, device)
    step = TrainStep(module, optimizer, opts, device, fullgraph=task.compile_fullgraph(cfg) and not info.enabled,
                     annotate=annotate, grad_clip=cfg.optim.grad_clip)

    notes = []
    drop_last = cfg.data.drop_last or opts.compile
    n_train = data_info["n"]["train"]
    rest = n_train % cfg.optim.batch_size
    if opts.compile and not cfg.data.drop_last and rest:
        notes.append(f"--compile: static shapes, so the last partial batch ({rest} of {n_train} tuples) is dropped "
                     "every epoch (the reference keeps it)")
    if drop_last and n_train < cfg.optim.batch_size:
        why = "--drop-last" if cfg.data.drop_last else "--compile (static shapes drop the last partial batch)"
        raise ValueError(f"{data_info['root']}: the train split has {n_train} tuples, fewer than --batch-size "
                         f"{cfg.optim.batch_size}, and {why}: no step per epoch. Fix: pass a --batch-size of at most "
                         f"{n_train}, or drop {why.split()[0]}")
    loader = make_loader(cfg.data.loader, dataset_root=Path(data_info["root"]), split="train",
                         images=splits["train"].images, batch_size=cfg.optim.batch_size, seed=cfg.seed,
                         drop_last=drop_last, device=device, rank=info.rank, world_size=info.world_size,
                         workers=cfg.data.workers, shard_dir=Path(cfg.data.shard_dir) if cfg.data.shard_dir else None,
                         shuffle_buffer=cfg.data.shuffle_buffer)
    return Engine(cfg, device, info, task, model, optimizer, recipe, step, loader, opts, splits, data_info,
                  notes, warnings)


def train(cfg: TrainConfig, console: Console | None = None) -> dict:
    """Train a model as configured; returns the last metrics row. Outputs go to cfg.out.

    cfg.nproc > 1 outside a torchrun launch re-launches this training in that many processes.
    A run folder that already holds a run is refused unless cfg.resume (continue it) or cfg.overwrite (replace it);
    nothing in it is touched before the data and the settings are checked. A signal stops the run with a
    checkpoint and raises signals.Stopped.
    """
    info = distributed.env_info()
    if cfg.nproc > 1 and not info.enabled:
        console = console or Console()
        for warning in preflight(cfg):
            console.print(f"[red]warning:[/] {warning}")
        return _launch(cfg, console)
    if info.is_main:
        resume.check_out_folder(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    console = console if console is not None and info.is_main else Console(quiet=not info.is_main)
    if info.enabled:
        cfg.nproc = info.world_size  # a direct torchrun launch: the config records the real process count
    device = resolve_device(cfg.device, info.local_rank)
    distributed.init(info, device)
    try:
        return _Loop(build_engine(cfg, info, device, console=console), console).run()
    finally:
        distributed.shutdown()


def _launch(cfg: TrainConfig, console: Console) -> dict:
    console.print(f"launching {cfg.nproc} processes (torch.distributed.run, global batch {cfg.optim.batch_size})")
    rc, signum, result = distributed.launch(cfg.to_dict(), cfg.nproc)
    if "stopped" in result:
        stop = Stopped(result["stopped"], result["step"], Path(result["checkpoint"]), result.get("metrics"))
        console.print(f"[yellow]{stop}[/]")
        raise stop
    if "error" in result:
        raise (ValueError if result["kind"] == "bad_input" else RuntimeError)(result["error"])
    if rc != 0 or "metrics" not in result:
        kept = resume.ckpt_files(Path(cfg.out))
        if signum is not None and kept:
            raise Stopped(signum, kept[-1][0], kept[-1][1])
        raise RuntimeError(f"data-parallel training exited with code {rc} (see the worker output above)")
    return result["metrics"]


_NONE = 2**62  # "no non-finite step" in the min-reduction over ranks


class _Loop:
    """The outer loop around Engine.step: logging, non-finite checks, epochs, evaluation, checkpoints, stops."""

    def __init__(self, eng: Engine, console: Console):
        self.eng, self.console, self.cfg = eng, console, eng.cfg
        self.out = Path(self.cfg.out)
        self.main = eng.info.is_main
        self.state = resume.LoopState()
        self.last_ckpt: Path | None = None
        self._events_logged = 0
        """How many of the recipe's events the sinks have had."""
        total = self.cfg.optim.epochs * len(eng.loader)
        self.total_steps = min(total, self.cfg.optim.max_steps) if self.cfg.optim.max_steps is not None else total

    # ----- set-up --------------------------------------------------------------------------------------------
    def _start(self) -> bool:
        """Restore (--resume) and prepare the run folder; False when there is nothing to do. Everything that can
        refuse the run (the checkpoint, its compatibility, the data) runs before the folder is touched."""
        cfg, eng = self.cfg, self.eng
        restored = self._restore() if cfg.resume else None
        if restored is not None and self.state.step >= self.total_steps:
            if self.main and resume.repair_latest(self.out, restored):
                self.console.print(f"[yellow]note:[/] {self.out / resume.LATEST} now points at {restored.name}")
            self.console.print(f"nothing to do: the run is at step {self.state.step} of {self.total_steps} (pass a "
                               "larger --epochs or --max-steps to train on); nothing was changed")
            return False
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            stale = resume.clean_stale(self.out)
            if stale:
                self.console.print(f"[yellow]note:[/] removed {len(stale)} temporary file(s) of an interrupted "
                                   f"checkpoint write: {', '.join(stale)}")
            if restored is not None:
                if resume.repair_latest(self.out, restored):
                    self.console.print(f"[yellow]note:[/] {self.out / resume.LATEST} was behind the newest "
                                       f"checkpoint; it now points at {restored.name}")
                resume.truncate_metrics(self.out, self.state.metrics_rows)
            elif cfg.overwrite:
                removed = resume.remove_run(self.out)
                if removed:
                    self.console.print(f"[yellow]--overwrite:[/] removed the previous run's {', '.join(removed)}")
            atomic_write_json(self.out / resume.CONFIG, {"config": cfg.to_dict(), "data": eng.data_info,
                                                         "kernels": self.kernels})
            record_training_start(self.out, eng.device, resumed=cfg.resume)
        procs = f" x {eng.info.world_size} processes" if eng.info.enabled else ""
        active = eng.recipe.active_elements()
        recipe = eng.recipe.name + (f" ({', '.join(active)})" if active else "")
        self.console.print(f"[bold]cmvae-engine train[/] {eng.task.describe(cfg, eng.data_info)} on {eng.device}"
                           f"{procs}, recipe {recipe} -> {self.out}")
        self.console.print(f"step: {eng.opts.describe()}; loader {cfg.data.loader}, batch {cfg.optim.batch_size}"
                           + (f" ({cfg.optim.batch_size // eng.info.world_size} per process)" if procs else "")
                           + f"; fused ops: {self.kernels['backend']}")
        for note in eng.notes:
            self.console.print(f"[yellow]note:[/] {note}")
        for warning in eng.warnings:
            self.console.print(f"[red]warning:[/] {warning}")
        return True

    @property
    def kernels(self) -> dict:
        """The fused-op backend this process resolved to (recorded in config.json and every checkpoint)."""
        return {"requested": self.cfg.kernels, "device": self.eng.device.type,
                "backend": kernels.active_backend(self.eng.device)}

    def _restore(self) -> Path:
        """Load the newest valid checkpoint into model, optimiser, recipe, RNG and loop state, after checking it
        belongs to this run; touches no file. Returns the file it came from."""
        eng = self.eng
        latest = resume.find_latest(self.out, eng.device)
        payload, path = latest.payload, latest.path
        for skipped in latest.skipped:
            self.console.print(f"[yellow]note:[/] skipped a checkpoint that does not load: {skipped}")
        resume.check_compatible(payload["config"], self.cfg.to_dict(), path)
        moved = resume.check_same_data(payload.get("run"), eng.data_info,
                                       payload["config"].get("data", {}).get("dataset"), path)
        try:
            eng.model.load_state_dict(payload["model"], strict=True)
            eng.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise resume.RunFolderError(f"--resume: {path} holds weights that do not fit the model its config "
                                        f"describes ({first}); it was not written by this version of cmvae-engine for "
                                        "this run. Fix: resume from another ckpt-*.pt of the run, or drop --resume and "
                                        "train into another --out") from None
        eng.recipe.load_state_dict(payload.get("recipe") or {})
        if eng.step.scaler is not None and payload.get("scaler"):
            eng.step.scaler.load_state_dict(payload["scaler"])
        rng = payload.get("rng") or []
        if len(rng) == eng.info.world_size:
            resume.set_rng_state(rng[eng.info.rank])
        else:
            self.console.print(f"[yellow]note:[/] the checkpoint holds the sampling RNG of {len(rng)} processes, "
                               f"this run has {eng.info.world_size}: sampling continues from fresh seeds")
        self.state = payload["state"]
        if moved:
            self.console.print(f"[yellow]note:[/] {moved}")
        self._note_backend_change((payload.get("run") or {}).get("kernels"))
        self.console.print(f"resumed {self.out} from {path.name} at step {self.state.step} (epoch "
                           f"{self.state.epoch + 1}, batch {self.state.batch_in_epoch} of {len(eng.loader)})")
        return path

    def _note_backend_change(self, saved: dict | None) -> None:
        now = self.kernels
        if not saved or saved.get("device") != now["device"] or saved.get("backend") == now["backend"]:
            return
        from cmvae_engine.kernels import backends

        reasons = {"ext": backends.ext_unavailable_reason, "triton": backends.triton_unavailable_reason}
        why = reasons.get(saved["backend"], lambda _: "")(now["device"])
        because = f" because {why}" if why else f" (--kernels {now['requested']})"
        self.console.print(f"[yellow]note:[/] this run trained with the {saved['backend']} fused-op backend on "
                           f"{now['device']}; this process resolves --kernels {now['requested']} to {now['backend']}"
                           f"{because}. Every backend computes the same ops (checked against the torch reference), "
                           "to rounding, so the resumed run is not bit-identical to an uninterrupted one")

    # ----- reading the device ----------------------------------------------------------------------------
    def _read(self) -> tuple[float, int]:
        """Fold the device accumulators into the epoch totals (all ranks); raise on a non-finite loss."""
        stats = self.eng.step.stats
        n_t = torch.tensor(float(stats.n), dtype=torch.float64, device=stats.loss.device)
        loss, n = distributed.all_sum(torch.stack([stats.loss, n_t])).tolist()  # sync point
        first_bad = int(distributed.all_min(stats.first_bad.where(stats.first_bad >= 0, _NONE)).item())
        stats.reset()
        if first_bad != _NONE or not math.isfinite(loss):
            where = f"step {first_bad}" if first_bad != _NONE else f"or before step {self.state.step}"
            kept = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written"
            raise FloatingPointError(f"non-finite loss at {where}: training stopped; {kept} "
                                     f"(resume from it with --resume, e.g. with a lower --lr)")
        self.state.epoch_loss += loss
        self.state.epoch_n += int(n)
        return loss, int(n)

    def _checkpoint(self) -> None:
        eng = self.eng
        self._read()  # never save a model whose loss is not finite
        distributed.check_replicas(eng.model, self.state.step)
        rng = [resume.rng_state()]
        if eng.info.enabled:
            import torch.distributed as dist

            gathered = [None] * eng.info.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if self.main:
            scaler = eng.step.scaler.state_dict() if eng.step.scaler is not None else None
            self.last_ckpt = resume.write(self.out, model=eng.model, optimizer=eng.optimizer, config=self.cfg.to_dict(),
                                          state=self.state, rng=rng, recipe_state=eng.recipe.state_dict(),
                                          scaler_state=scaler, keep=self.cfg.ckpt.keep,
                                          run_info={"data": eng.data_info, "kernels": self.kernels})
        distributed.barrier()

    # ----- the loop ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train; a full disk is one DiskFullError saying what was kept, a signal a Stopped after a checkpoint."""
        try:
            return self._run()
        except OSError as e:
            if e.errno not in resume.DISK_FULL:
                raise
            what = Path(e.filename).name if e.filename else "the run's files"
            raise resume.disk_full_error(self.out, e, what, self._checkpoint_bytes()) from None

    def _checkpoint_bytes(self) -> int:
        if self.last_ckpt is not None and self.last_ckpt.is_file():
            return self.last_ckpt.stat().st_size
        # parameters plus Adam's two moments and amsgrad's running maximum
        return 4 * sum(p.numel() * p.element_size() for p in self.eng.model.parameters())

    def _stop(self, stop: StopFlag) -> Stopped:
        self._checkpoint()
        signum = stop.signum or signal.SIGTERM
        stopped = Stopped(signum, self.state.step, self.last_ckpt or self.out / resume.LATEST, self.state.metrics)
        self.console.print(f"[yellow]{stopped}[/]")
        return stopped

    def _run(self) -> dict:
        if not self._start():
            return self.state.metrics
        cfg, eng, st = self.cfg, self.eng, self.state
        t_start, start_step = time.perf_counter(), st.step
        t_log = t_start
        self.sinks = (open_sinks(cfg.log, self.out, resume_step=st.step if cfg.resume else None,
                                 config=cfg.to_dict()) if self.main else Sinks([]))
        self.board = Board(self.console, disable=not self.main)
        probe_times: dict[int, float] = {}
        with StopFlag() as stop, self.board, contextlib.closing(self.sinks):
            if st.step == 0:
                self._warm_start(stop)
            self._log_events()
            bar = self.board.bar("train", self.total_steps, completed=st.step)
            probe_times[0] = time.perf_counter()
            while st.epoch < cfg.optim.epochs and st.step < self.total_steps:
                for xb in data_stream(eng.loader, st.epoch, st.batch_in_epoch):
                    scalars = eng.recipe.scalars(st.step)
                    eng.step(xb, st.step + 1, scalars)  # the step
                    st.step += 1
                    st.batch_in_epoch += 1
                    eng.recipe.after_step(StepContext(st.step, st.epoch, eng.model, eng.optimizer, eng.train_images,
                                                      eng.device, self.console))
                    bar.advance()
                    if st.step - start_step in PROBE_STEPS:
                        self._probe_cost(st.step - start_step, probe_times)
                    logging = st.step % cfg.log_every == 0 or st.step == self.total_steps
                    if logging:
                        loss, n = self._read()
                        now = time.perf_counter()
                        rate = n / (now - t_log)
                        bar.note(f"epoch {st.epoch + 1} loss {loss / max(n, 1):,.1f} {rate:,.0f} samples/s")
                        self.sinks.step(st.step, {"epoch": st.epoch + 1, "loss": loss / max(n, 1),
                                                  "samples_per_s": rate, "elapsed_s": now - t_start,
                                                  "lr": [g["lr"] for g in eng.optimizer.param_groups], **scalars})
                        self._log_events()
                        t_log = now
                    stopping = self._should_stop(stop, logging)
                    periodic = cfg.ckpt.every and st.step % cfg.ckpt.every == 0
                    # the end of an epoch or of the run writes its own checkpoint
                    periodic = periodic and st.batch_in_epoch < len(eng.loader) and st.step < self.total_steps
                    if stopping:
                        raise self._stop(stop)
                    if periodic:
                        self._checkpoint()
                    if st.step >= self.total_steps:
                        break
                self._end_epoch(t_start, start_step)
            if self.main:
                with self.board.phase("writing the run's image grids"):
                    files = eng.task.save_outputs(eng.model, cfg, eng.splits, self.out, eng.device)
        if self.main:
            self.console.print(f"[green]done[/] in {format_duration(time.perf_counter() - t_start)}. Outputs in "
                               f"{self.out}/: " + ", ".join(["metrics.jsonl", "steps.jsonl", "checkpoint.pt",
                                                            "config.json", "run_info.json", *files]))
        return st.metrics

    def _probe_cost(self, steps_done: int, times: dict[int, float]) -> None:
        """Time the first steps (once per session) and say what a long run is about to cost."""
        if self.eng.device.type == "cuda":
            torch.cuda.synchronize(self.eng.device)  # once per session, at the two probe steps
        times[steps_done] = time.perf_counter()
        first, last = PROBE_STEPS
        if not self.main or 0 not in times:
            return
        cfg = self.cfg
        width = getattr(cfg.model, "width", None)
        size = "" if width is None else (", full width" if width >= 1 else f", width {width:g}")
        kind = getattr(cfg.model, "kind", "")
        clustering = kind in ("cmvae", "mmvaeplus")  # the recipes and the quick-start hint are theirs
        what = ((f"{cfg.recipe} recipe{size}" if clustering else f"{kind}{size}") + f", {cfg.optim.epochs} epochs"
                + (f" (--max-steps {cfg.optim.max_steps})" if cfg.optim.max_steps is not None else ""))
        if steps_done == first:  # a first look: step 1 holds one-off costs, so this over-estimates a little
            p = project(self.total_steps, self.state.step, times[first] - times[0], first)
            message = cost_warning(p, what, self.eng.device.type, first_step=True, quick_start_hint=clustering)
        elif steps_done == last and first in times:
            p = project(self.total_steps, self.state.step, times[last] - times[first], last - first)
            message = cost_warning(p, what, self.eng.device.type, quick_start_hint=clustering)
        else:
            return
        if message:
            self.console.print(f"[bold yellow]this run is long:[/] {message}")

    def _log_events(self) -> None:
        """The recipe's events not yet handed to the sinks (its event list only grows)."""
        events = self.eng.recipe.events()
        for event in events[self._events_logged:]:
            self.sinks.event(int(event.get("step", self.state.step)), event)
        self._events_logged = len(events)

    def _warm_start(self, stop: StopFlag) -> None:
        """The recipe's work before step 1 (the paper: none). A signal stops it with its progress in a checkpoint at
        step 0 (raising Stopped); --resume continues it."""
        eng = self.eng
        ctx = WarmStartContext(eng.model, eng.train_images, eng.device, self.cfg.optim.batch_size, self.cfg.seed,
                               self.console, should_stop=lambda: self._should_stop(stop, True), board=self.board)
        with torch.random.fork_rng(devices=[eng.device] if eng.device.type == "cuda" else []):
            eng.recipe.warm_start(ctx)  # draws from its own generators: the step's sampling noise is untouched
        if stop:
            raise self._stop(stop)

    def _should_stop(self, stop: StopFlag, logging: bool) -> bool:
        if not self.eng.info.enabled:
            return bool(stop)
        # Ranks must stop at the same step: they agree at log intervals (already a sync point), and on the signal
        # (the exit code names it) even where it reached one rank only.
        if not logging:
            return False
        signum = int(-distributed.all_min(-torch.tensor(float(stop.signum or 0), device=self.eng.device)).item())
        if signum and stop.signum is None:
            stop.signum = signum
        return signum > 0

    def _end_epoch(self, t_start: float, start_step: int) -> None:
        """The metrics row of the epoch (or of the partial epoch where max_steps ends the run) and a checkpoint."""
        cfg, eng, st = self.cfg, self.eng, self.state
        self._read()
        elapsed = time.perf_counter() - t_start
        complete = st.batch_in_epoch >= len(eng.loader)
        row = {"epoch": st.epoch + 1, "step": st.step, "train_loss": st.epoch_loss / max(st.epoch_n, 1),
               "elapsed_s": elapsed, "samples_per_s": (st.step - start_step) * cfg.optim.batch_size / elapsed,
               **eng.task.metrics_fields(cfg)}
        if self.main and cfg.eval_every and ((st.epoch + 1) % cfg.eval_every == 0 or st.step >= self.total_steps):
            with self.board.phase(f"epoch {st.epoch + 1}: evaluating on the test split", done_line=False) as bar:
                row.update(eng.task.evaluate(eng.model, cfg, eng.splits, eng.device, progress=bar))
        if self.main:
            resume.append_metrics(self.out, row)
            self.sinks.epoch(st.step, row)
        st.metrics = row
        if complete:
            st.epoch, st.batch_in_epoch, st.epoch_loss, st.epoch_n = st.epoch + 1, 0, 0.0, 0
            st.metrics_rows += 1
        # A partial epoch's row stays out of metrics_rows: a resumed run rewrites it when the epoch completes.
        with self.board.phase("writing a checkpoint", done_line=False):
            self._checkpoint()
        self.console.print(epoch_line(row, cfg.optim.epochs, skip=tuple(eng.task.metrics_fields(cfg))),
                           markup=False, highlight=False)
