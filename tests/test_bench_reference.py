"""`bench train --reference-code`: the machinery that times the authors' code beside ours, run on a stand-in
repository with the same layout and interfaces (their real code trains at full width only, minutes per step on
a CPU). Checked: their `models/__init__.py` is never executed, torchvision is stubbed only where it cannot be
imported, both sides run interleaved in worker processes with their own peak RSS, and the JSON is complete."""

import json
import textwrap

import pytest
import torch

from cmvae_engine.bench.reference import _check_comparable, compare_reference, reference_src
from cmvae_engine.engine.cli.profile_cmd import parse_train_flags
from cmvae_engine.engine.step import auto_amp

STAND_IN_MODEL = '''
import torch
from torch import nn
from torchvision.utils import save_image, make_grid  # as theirs: only for saving images
from utils import Constants


class PolyMNIST_5modalities(nn.Module):
    def __init__(self, params):
        super().__init__()
        assert params.latent_dim_c == 4 and params.priorposterior == "Laplace" and params.no_cuda
        self.lin = nn.Linear(3 * 28 * 28, params.latent_dim_z)
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
'''

STAND_IN_OBJECTIVES = '''
import torch
from utils import Constants


def cmvae_iwae(model, x, K=1):
    assert isinstance(x, list) and len(x) == 5 and K == 1
    return sum(model.lin(xm.flatten(1)).sum() for xm in x) * Constants.eta
'''


@pytest.fixture
def stand_in(tmp_path):
    src = tmp_path / "CMVAE" / "src"
    (src / "models").mkdir(parents=True)
    (src / "models" / "__init__.py").write_text("raise ImportError('the CUB model needs other packages')\n")
    (src / "models" / "cmvae_polyMNIST.py").write_text(textwrap.dedent(STAND_IN_MODEL))
    (src / "objectives.py").write_text(textwrap.dedent(STAND_IN_OBJECTIVES))
    (src / "utils.py").write_text("class Constants:\n    eta = 1e-20\n")
    return tmp_path / "CMVAE"


def _cfg(*flags: str):
    return parse_train_flags("polydigits", ["--width", "0.05", "--batch-size", "8", "--clusters", "4",
                                            "--threads", "1", "--device", "cpu", *flags], "test")


def test_reference_comparison_runs_interleaved_in_two_processes(stand_in, tmp_path):
    path, r = compare_reference(_cfg(), stand_in, steps=2, warmup=1, out_dir=tmp_path / "out", strict=False)
    assert json.loads(path.read_text()) == r
    assert path.parent == tmp_path / "out" and path.name.startswith("train-vs-reference-")
    for side in ("ours", "reference"):
        row = r[side]
        assert len(row["step_ms"]) == 2 and all(t > 0 for t in row["step_ms"])
        assert row["peak_rss_mb"] > 50 and row["gflops"] > 0 and row["threads"] == 1
    assert isinstance(r["reference"]["torchvision_stubbed"], bool)
    assert r["reference"]["n_parameters"] == 3 * 28 * 28 * 32 + 32 + 2
    assert "per-tower encoders" in r["ours"]["options"] and "per-pair decoders" in r["ours"]["options"]  # CPU defaults
    assert r["matmul_peak_gflops"] > 0 and r["flops_per_step"] > 0
    assert r["speedup_vs_reference"] == pytest.approx(r["reference"]["step_ms_median"] / r["ours"]["step_ms_median"])
    assert len(r["load_average_before"]) == 3 and r["config"]["n_modalities"] == 5
    ours_dtype = "bfloat16" if auto_amp(torch.device("cpu"), torch.bfloat16) else "float32"  # the --amp default
    assert r["config"]["compute_dtype"] == {"ours": ours_dtype, "reference": "float32"}


def test_reference_comparison_refuses_what_is_not_comparable(stand_in, tmp_path):
    with pytest.raises(ValueError, match="--width 0.05"):
        _check_comparable(_cfg())
    with pytest.raises(FileNotFoundError, match="cmvae_polyMNIST.py"):
        reference_src(tmp_path / "nowhere")
    assert reference_src(stand_in) == reference_src(stand_in / "src")
