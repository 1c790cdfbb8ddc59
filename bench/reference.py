"""Our training step beside the authors' released code, same configuration, one run.

The authors' repository is a folder the user points to (its `src/` holds `models/`, `objectives.py`, `utils.py`);
nothing of it is part of this project: it is imported from that path at run time, in a worker process of its own.
It imports torchvision only to save images and build its data sets; where torchvision cannot be imported, a stub
module stands in (nothing here saves an image or reads their data sets). Its `models` package also imports the
CUB model (other dependencies), so only `models/cmvae_polyMNIST.py` and what it imports are loaded.

Each side runs in its own worker process (so each peak RSS is its own): ours builds the engine exactly as
`cmvae-engine train` would from the given train flags, on a data folder of random images; theirs builds
`PolyMNIST_5modalities` with its training script's settings (Adam, lr 1e-3, amsgrad) and trains on random images
with their objective (`cmvae_iwae` / `cmvae_dreg`, K = our S). The parent interleaves the two a step at a time
(alternating which goes first) so that the load of a shared machine falls on both; it measures the fp32 matmul
peak between the steps and counts each step's convolution/linear FLOPs analytically (engine/profiling.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

MARK = "@@cmvae-bench@@"  # prefix of the workers' replies: anything else they print is passed through
SIDES = ("ours", "reference")


# ----- the authors' code -----------------------------------------------------------------------------------------
def reference_src(path: str | Path) -> Path:
    """The authors' `src/` folder from the repository root (or the src folder itself)."""
    root = Path(path).expanduser()
    for cand in (root / "src", root):
        if (cand / "models" / "cmvae_polyMNIST.py").is_file() and (cand / "objectives.py").is_file():
            return cand.resolve()
    raise FileNotFoundError(f"--reference-code {path}: no src/models/cmvae_polyMNIST.py and src/objectives.py "
                            "there. Fix: pass the root of the authors' CMVAE repository (a checkout of their code)")


def reference_commit(path: str | Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _stub_torchvision() -> None:
    """Stand-ins for the torchvision names the authors' PolyMNIST modules import (image saving, transforms)."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]

    def unavailable(*_a, **_k):
        raise RuntimeError("torchvision is stubbed in this benchmark: nothing here saves images")

    tv = types.ModuleType("torchvision")
    utils = types.ModuleType("torchvision.utils")
    utils.save_image = utils.make_grid = unavailable
    transforms = types.ModuleType("torchvision.transforms")
    transforms.ToTensor = type("ToTensor", (), {"__call__": lambda self, pic: unavailable()})
    datasets = types.ModuleType("torchvision.datasets")
    tv.utils, tv.transforms, tv.datasets = utils, transforms, datasets
    sys.modules.update({"torchvision": tv, "torchvision.utils": utils, "torchvision.transforms": transforms,
                        "torchvision.datasets": datasets})


def load_reference(path: str | Path) -> tuple[type, types.ModuleType, bool]:
    """(their PolyMNIST_5modalities class, their objectives module, whether torchvision was stubbed)."""
    src = reference_src(path)
    stubbed = False
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or built for another torch (fails on its C++ ops at import)
        _stub_torchvision()
        stubbed = True
    sys.path.insert(0, str(src))
    # `models` as a bare namespace over their folder: its __init__ would import the CUB model too.
    pkg = types.ModuleType("models")
    pkg.__path__ = [str(src / "models")]
    sys.modules["models"] = pkg
    model_mod = importlib.import_module("models.cmvae_polyMNIST")
    objectives = importlib.import_module("objectives")
    return model_mod.PolyMNIST_5modalities, objectives, stubbed


def reference_params(cfg) -> argparse.Namespace:
    """Their training script's arguments for our configuration."""
    m = cfg.model
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return argparse.Namespace(priorposterior="Laplace" if m.family == "laplace" else "Normal",
                              latent_dim_w=m.w_dim, latent_dim_z=m.z_dim, latent_dim_c=m.n_clusters,
                              learn_prior_c=True, beta=cfg.beta, llik_scaling=0.0, K=cfg.n_samples,
                              obj=cfg.objective, batch_size=cfg.optim.batch_size, datadir=".",
                              no_cuda=not cuda)


# ----- workers ---------------------------------------------------------------------------------------------------
def _reply(obj: dict) -> None:
    sys.stdout.write(f"{MARK} {json.dumps(obj)}\n")
    sys.stdout.flush()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours(cfg_json: str):
    from cmvae_engine.engine.config import TrainConfig
    from cmvae_engine.engine.profiling import batches
    from cmvae_engine.engine.trainer import build_engine

    cfg = TrainConfig.from_dict(json.loads(cfg_json), where="bench reference worker")
    eng = build_engine(cfg)
    it = batches(eng)
    state = {"i": 0}

    def step() -> None:
        i = state["i"]
        eng.step(next(it), i + 1, eng.recipe.scalars(i))
        state["i"] = i + 1

    return step, eng.device, {"options": eng.opts.describe(), "kernels": cfg.kernels,
                              "compute_dtype": eng.opts.compute_dtype_name}


def _theirs(cfg_json: str, ref_path: str):
    from cmvae_engine.engine.config import TrainConfig

    cfg = TrainConfig.from_dict(json.loads(cfg_json), where="bench reference worker")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model_cls, objectives, stubbed = load_reference(ref_path)
    torch.manual_seed(cfg.seed)
    params = reference_params(cfg)
    model = model_cls(params).to(device)
    model.train()
    optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=cfg.optim.lr,
                                 amsgrad=cfg.optim.amsgrad)
    objective = getattr(objectives, f"cmvae_{cfg.objective}")
    b, n_mod = cfg.optim.batch_size, cfg.model.n_modalities
    gen = torch.Generator().manual_seed(cfg.seed)
    data = [[torch.rand(b, 3, 28, 28, generator=gen).to(device) for _ in range(n_mod)] for _ in range(2)]
    state = {"i": 0}

    def step() -> None:  # their train loop's body
        x = data[state["i"] % 2]
        optimizer.zero_grad()
        loss = -objective(model, x, K=params.K)
        loss.backward()
        optimizer.step()
        loss.item()
        state["i"] += 1

    n_params = sum(p.numel() for p in model.parameters())
    return step, device, {"options": "the authors' code: eager fp32, per-modality VAEs, torch.distributions",
                          "torchvision_stubbed": stubbed, "n_parameters": n_params, "compute_dtype": "float32"}


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=SIDES, required=True)
    p.add_argument("--config", required=True, help="TrainConfig as JSON")
    p.add_argument("--reference-code")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.side == "ours":
        step, device, info = _ours(a.config)
    else:
        step, device, info = _theirs(a.config, a.reference_code)
    info.update(setup_s=time.perf_counter() - t0, threads=torch.get_num_threads(), rss_after_setup_mb=_peak_rss_mb(),
                device=str(device))
    _reply({"ready": True, **info})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "steps":
            times = []
            for _ in range(cmd["n"]):
                _sync(device)
                t = time.perf_counter()
                step()
                _sync(device)
                times.append(1e3 * (time.perf_counter() - t))
            _reply({"ms": times})
        elif cmd["op"] == "quit":
            _reply({"peak_rss_mb": _peak_rss_mb()})
            return 0
    return 1


class _Worker:
    def __init__(self, side: str, cfg_json: str, ref_path: str | None):
        args = [sys.executable, "-m", "cmvae_engine.bench.reference", "--side", side, "--config", cfg_json]
        if ref_path:
            args += ["--reference-code", str(ref_path)]
        env = dict(os.environ, MPLBACKEND="Agg")
        self.side = side
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            sys.stderr.write(line)
        raise RuntimeError(f"bench train --reference-code: the {self.side} worker exited (code {self.proc.wait()}); "
                           "see its error above")

    def ask(self, **cmd) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ----- the comparison --------------------------------------------------------------------------------------------
def random_image_data(root: Path, n_modalities: int, n_train: int, seed: int = 0) -> Path:
    """A data folder in our format of uniformly random 28x28 RGB images (train, valid, test)."""
    from cmvae_engine.cmvae.data.format import MultimodalSplit, write_dataset

    rng = np.random.default_rng(seed)

    def split(n: int) -> MultimodalSplit:
        return MultimodalSplit([rng.integers(0, 256, (n, 3, 28, 28), dtype=np.uint8) for _ in range(n_modalities)])

    return write_dataset(root, {"train": split(n_train), "valid": split(16), "test": split(16)}, name="random")


def matmul_peak_gflops(device: torch.device, n: int = 2048, seconds: float = 1.0) -> float:
    """Best fp32 torch.mm rate (GFLOP/s) over `seconds`, measured now with the current thread count."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def _check_comparable(cfg, strict: bool = True) -> None:
    m = cfg.model
    problems = []
    if strict and m.width != 1.0:
        problems.append(f"--width {m.width:g} (their networks exist at full width only: pass --width 1.0)")
    if m.n_modalities != 5:
        problems.append(f"{m.n_modalities} modalities (their PolyMNIST model has 5)")
    if m.kind != "cmvae":
        problems.append(f"--model {m.kind} (their code is the CMVAE)")
    if cfg.objective not in ("iwae", "dreg"):
        problems.append(f"--objective {cfg.objective}")
    if problems:
        raise ValueError("bench train --reference-code compares like with like; not comparable: " + "; ".join(problems))


def compare_reference(cfg, ref_path: str | Path, *, steps: int, warmup: int, out_dir: str | Path = "bench/results",
                      strict: bool = True) -> tuple[Path, dict]:
    """Time our step (cfg, any train flags) and the authors' code side by side; write and return the JSON.
    strict=False lets a reduced width through (only for tests of the machinery on a stand-in reference)."""
    from cmvae_engine.bench.kernels import commit, device_name
    from cmvae_engine.engine.profiling import step_flops
    from cmvae_engine.engine.run_info import cpu_name

    reference_src(ref_path)
    cfg.model.n_modalities = 5
    _check_comparable(cfg, strict)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cmvae-ref-bench-") as tmp:
        data = random_image_data(Path(tmp) / "random", 5, 2 * cfg.optim.batch_size, cfg.seed)
        cfg.data.dataset = str(data)
        cfg.data.loader = "resident"
        cfg.eval_every = 0
        cfg.out = str(Path(tmp) / "run")
        cfg_json = json.dumps(cfg.to_dict())
        workers = {s: _Worker(s, cfg_json, str(ref_path) if s == "reference" else None) for s in SIDES}
        try:
            info = {s: w.read() for s, w in workers.items()}
            for w in workers.values():
                w.ask(op="steps", n=warmup)
            torch.set_num_threads(info["ours"]["threads"])
            device = torch.device(info["ours"]["device"])
            peak = matmul_peak_gflops(device)
            ms: dict[str, list[float]] = {s: [] for s in SIDES}
            for i in range(steps):  # interleaved, alternating who goes first
                for s in (SIDES if i % 2 == 0 else SIDES[::-1]):
                    ms[s] += workers[s].ask(op="steps", n=1)["ms"]
            peak = max(peak, matmul_peak_gflops(device))
            rss = {s: w.ask(op="quit")["peak_rss_mb"] for s, w in workers.items()}
        finally:
            for w in workers.values():
                w.close()
    flops = step_flops(cfg.model, cfg.optim.batch_size, cfg.n_samples)
    sha, dirty = commit()
    rows = {}
    for s in SIDES:
        med = statistics.median(ms[s])
        rows[s] = {"step_ms_median": med, "step_ms": ms[s], "gflops": flops / (med / 1e3) / 1e9,
                   "fraction_of_matmul_peak": flops / (med / 1e3) / 1e9 / peak, "peak_rss_mb": rss[s],
                   **{k: v for k, v in info[s].items() if k != "ready"}}
    result = {
        "benchmark": "train-vs-reference", "device": device_name(device), "cpu": cpu_name(),
        "device_type": device.type, "threads": info["ours"]["threads"],
        "config": {"width": cfg.model.width, "batch_size": cfg.optim.batch_size, "n_modalities": 5,
                   "n_clusters": cfg.model.n_clusters, "z_dim": cfg.model.z_dim, "w_dim": cfg.model.w_dim,
                   "objective": cfg.objective, "n_samples": cfg.n_samples,
                   "compute_dtype": {s: rows[s]["compute_dtype"] for s in SIDES},
                   "data": "uniformly random images"},
        "steps": steps, "warmup": warmup, "interleaved": True,
        "flops_per_step": flops, "flops_method": "analytic conv + linear MACs x 2 x 3 (engine/profiling.step_flops)",
        "matmul_peak_gflops": peak, "matmul_peak_method": "best fp32 torch.mm 2048^3, same process and threads",
        "ours": rows["ours"], "reference": rows["reference"],
        "speedup_vs_reference": rows["reference"]["step_ms_median"] / rows["ours"]["step_ms_median"],
        "peak_rss_ratio_ours_over_reference": rows["ours"]["peak_rss_mb"] / rows["reference"]["peak_rss_mb"],
        "reference_code": str(Path(ref_path).resolve()), "reference_commit": reference_commit(ref_path),
        "commit": sha, "commit_dirty": dirty, "torch": torch.__version__, "python": platform.python_version(),
        "numpy": np.__version__, "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "note": "the machine may be shared: see the load averages (1, 5, 15 min) before and after",
    }
    slug = "".join(ch if ch.isalnum() else "-" for ch in result["device"].lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    from cmvae_engine.engine.checkpoint import atomic_write_json

    path = Path(out_dir) / f"train-vs-reference-{slug[:60]}-{stamp}.json"
    atomic_write_json(path, result)
    return path, result


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
