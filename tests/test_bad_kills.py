"""A training process killed at each point of the checkpoint write (os._exit from the writer's fault hook, in a
subprocess: no handler, no cleanup, as SIGKILL) leaves a folder that still holds the previous good state, and
`--resume` continues from the newest checkpoint that was completely written, cleans up the killed writer's
temporary files, re-points checkpoint.pt, and ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import MultimodalSplit, write_dataset
from cmvae_engine.engine import resume, trainer
from cmvae_engine.engine.checkpoint import load_checkpoint
from cmvae_engine.engine.config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig

KILLED = 9
# One interpreter imports the engine once, then forks one process per case before any torch work has run (as a
# fork server does); each trains until the writer's fault hook reaches its point and exits there with os._exit:
# no exception handler, no cleanup, as a SIGKILL. The parent prints each case's exit status.
_CHILDREN = """
import json, os, sys
import torch._dynamo  # what training imports lazily (Adam, the task, sklearn's metrics): once, before the forks
from cmvae_engine.engine import resume, trainer
from cmvae_engine.engine.config import TrainConfig
from cmvae_engine.engine.tasks import cmvae_task

cases = json.loads(sys.argv[1])
pids = {}
for name, (cfg, point, at_write) in cases.items():
    pid = os.fork()
    if pid == 0:
        writes = [0]

        def fault(where, point=point, at_write=at_write):
            writes[0] += where == "tmp-open"
            if where == point and writes[0] == at_write:
                os._exit(9)

        resume._FAULT = fault
        try:
            trainer.train(TrainConfig.from_dict(cfg))
        finally:
            os._exit(3)  # not killed: the point was never reached (or training failed)
    pids[name] = pid
print(json.dumps({name: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for name, pid in pids.items()}))
"""
# (point, the write it kills, the step --resume must continue from). Writes happen after steps 1, 2 (the end of
# epoch 1), 3 and 4 (the end); with --keep 2 the third write removes ckpt-1 last.
KILLS = {
    **{f"{p} of write 3": (p, 3, 2) for p in ("tmp-open", "tmp-half", "tmp-written")},
    **{f"{p} of write 3": (p, 3, 3) for p in ("ckpt-renamed", "link-made", "latest-renamed", "old-removed")},
}
FIRST = ("tmp-half", 1, None)  # a kill inside the very first write: no checkpoint yet
UNLINKED = ("ckpt-renamed", 1, 1)  # ckpt-1 written, checkpoint.pt not yet


def config(data: Path, out: Path, resume_: bool = False) -> TrainConfig:
    return TrainConfig(model=ModelConfig(n_clusters=3, z_dim=4, w_dim=4, width=0.0625),
                       data=DataConfig(dataset=str(data)), optim=OptimConfig(epochs=2, batch_size=32),
                       ckpt=CheckpointConfig(every=1, keep=2), out=str(out), log_every=1, eval_every=0, seed=3,
                       device="cpu", kernels="torch", threads=1, resume=resume_)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    splits = {name: MultimodalSplit([rng.integers(0, 256, (n, 3, 28, 28), dtype=np.uint8) for _ in range(2)])
              for name, n in (("train", 64), ("test", 8))}
    return write_dataset(tmp_path_factory.mktemp("kill-data") / "ds", splits, name="toy")


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory):
    """One killed run per case (all at once: they share the cores)."""
    base = tmp_path_factory.mktemp("killed")
    cases = {**KILLS, "first write": FIRST, "no checkpoint.pt yet": UNLINKED}
    outs = {name: base / f"case{i}" for i, name in enumerate(cases)}
    spec = {name: (config(data, outs[name]).to_dict(), point, write) for name, (point, write, _) in cases.items()}
    proc = subprocess.run([sys.executable, "-c", _CHILDREN, json.dumps(spec)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == dict.fromkeys(cases, KILLED), proc.stderr[-3000:]
    return outs


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    trainer.train(config(data, out), Console(quiet=True))
    return out


def _temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["state"]["step"] == cb["state"]["step"] == 4
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    for (ka, va), (kb, vb) in zip(ca["optimizer"]["state"].items(), cb["optimizer"]["state"].items(), strict=True):
        assert ka == kb and all(torch.equal(va[s], vb[s]) for s in va)
    rows = [[json.loads(x)["train_loss"] for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b)]
    assert rows[0] == pytest.approx(rows[1], rel=1e-12) and len(rows[0]) == 2


@pytest.mark.parametrize("case", list(KILLS))
def test_a_writer_killed_at_each_point_loses_nothing_and_resumes_exactly(case, killed, uninterrupted, data):
    point, _, resumes_at = KILLS[case]
    out = killed[case]
    # What prune, eval and generate read is a complete earlier checkpoint, and the step-2 state is still there.
    assert load_checkpoint(out / "checkpoint.pt")["state"]["step"] in (2, 3)
    assert load_checkpoint(out / "ckpt-00000002.pt")["state"]["step"] == 2
    leftovers = _temporaries(out)
    if point in ("tmp-half", "tmp-written"):
        assert leftovers == [f".ckpt-00000003.pt.{_pid(leftovers[0])}.tmp"]
    elif point == "link-made":
        assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.pt.") and leftovers[0].endswith(".link")
    else:
        assert leftovers == []

    console = Console(record=True, width=400)
    trainer.train(config(data, out, resume_=True), console)
    said = console.export_text()
    assert f"from ckpt-{resumes_at:08d}.pt at step {resumes_at}" in said, said
    assert _temporaries(out) == []
    if leftovers:
        assert "temporary file(s) of an interrupted checkpoint write" in said
    assert sorted(p.name for p in out.glob("ckpt-*.pt")) == ["ckpt-00000003.pt", "ckpt-00000004.pt"]
    assert os.path.samefile(out / "checkpoint.pt", out / "ckpt-00000004.pt")
    assert_same_run(out, uninterrupted)


def _pid(name: str) -> str:
    return name.rsplit(".", 2)[-2]


def test_a_kill_inside_the_first_write_leaves_no_run_and_a_fresh_start_cleans_up(killed, uninterrupted, data):
    out = killed["first write"]
    assert resume.run_files(out) == [] and len(_temporaries(out)) == 1  # nothing to lose, nothing to resume
    with pytest.raises(ValueError, match="no checkpoint in"):
        trainer.train(config(data, out, resume_=True), Console(quiet=True))
    trainer.train(config(data, out), Console(quiet=True))  # allowed without --overwrite: no run was there
    assert _temporaries(out) == []
    assert_same_run(out, uninterrupted)


def test_ckpt_files_without_checkpoint_pt_are_a_run_that_resumes(killed, uninterrupted, data):
    out = killed["no checkpoint.pt yet"]
    assert not (out / "checkpoint.pt").exists() and resume.run_files(out) == ["ckpt-00000001.pt"]
    with pytest.raises(ValueError, match="already holds a run"):  # not silently replaced
        trainer.train(config(data, out), Console(quiet=True))
    console = Console(record=True, width=400)
    trainer.train(config(data, out, resume_=True), console)
    assert "from ckpt-00000001.pt at step 1" in console.export_text()
    assert_same_run(out, uninterrupted)


def test_a_damaged_newest_checkpoint_is_skipped_with_a_note(data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    cfg = config(data, out)
    cfg.optim.max_steps = 3
    trainer.train(cfg, Console(quiet=True))
    newest = out / "ckpt-00000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # e.g. a disk error after it was written
    (out / "checkpoint.pt").unlink()
    os.link(newest, out / "checkpoint.pt")
    console = Console(record=True, width=400)
    trainer.train(config(data, out, resume_=True), console)
    said = console.export_text()
    assert "skipped a checkpoint that does not load: ckpt-00000003.pt" in said and "at step 2" in said
    assert_same_run(out, uninterrupted)
