"""The CUDA half, on a CUDA device (marker `cuda`; the whole module is skipped without one). Run by the GPU
acceptance run's `cuda-tests` stage (bench/gpu_check.py): `pytest -m cuda tests/test_cuda.py`.

- every fused op on every backend that runs on CUDA (triton, the extension's CUDA kernels, the op's own
  plain-torch formulas) against the plain-torch reference on CUDA tensors: values and every gradient, fp64, fp32
  and bf16 inputs, the awkward shapes (N = 1, K = 1, odd sizes, D not a power of 2, several thread blocks);
- torch.library.opcheck of the registered ops (forward and backward) with CUDA inputs;
- the compiled training step with fullgraph=True on CUDA: the same gradients as eager;
- 30 training steps through the engine's loop on a small polydigits: the same loss curve with the fused ops on
  and off, bf16 autocast and fp32, CUDA graphs and none (tolerances stated at each test).

The inputs, tolerance rules and opcheck cases are the CPU tests' (tests/test_kernels.py): the fp64 truth is the
reference on the CPU in fp64; fp32 and bf16 results must be within 8x of plain torch's own error at that precision
on the same device (plus a floor of a few fp32 ulps of the quantity's scale).
"""

import json
import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import test_kernels as tk  # noqa: E402  (the CPU tests' inputs, checks and opcheck cases)

from cmvae_engine import kernels  # noqa: E402
from cmvae_engine.cmvae.config import ModelConfig  # noqa: E402
from cmvae_engine.cmvae.data import synth_polydigits  # noqa: E402
from cmvae_engine.cmvae.model import CMVAE  # noqa: E402
from cmvae_engine.engine.config import DataConfig, OptimConfig, StepConfig, TrainConfig  # noqa: E402
from cmvae_engine.engine.step import TrainStep, build_optimizer, prepare_model, resolve_options  # noqa: E402
from cmvae_engine.engine.tasks.cmvae_task import CMVAEObjective, CMVAETask  # noqa: E402
from cmvae_engine.engine.trainer import train  # noqa: E402
from cmvae_engine.kernels import backends  # noqa: E402
from cmvae_engine.kernels.image_nll import image_loglik_fused, image_loglik_ref  # noqa: E402
from cmvae_engine.kernels.importance_weights import importance_weights_fused, importance_weights_ref  # noqa: E402
from cmvae_engine.kernels.mixture_logpdf import mixture_logpdf_fused, mixture_logpdf_ref  # noqa: E402
from cmvae_engine.kernels.moe_logq import moe_logq_fused, moe_logq_ref  # noqa: E402

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _reason(backend: str) -> str:
    if backend == "triton":
        return backends.triton_unavailable_reason("cuda")
    return backends.ext_unavailable_reason("cuda") if backend == "ext" else ""


def _param(backend: str):
    reason = _reason(backend)
    return pytest.param(backend, marks=pytest.mark.skipif(bool(reason), reason=f"{backend} on CUDA: {reason}"))


BACKENDS = [_param(b) for b in ("triton", "ext", "torch")]
FUSED = [_param(b) for b in ("triton", "ext")]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 here: cuDNN's convolutions default to TF32 (10 mantissa bits), and cudnn.benchmark may
    pick other algorithms in each run, which would bury the fp32 comparisons below in rounding noise."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def restore_backend():
    old = kernels.get_backend()
    yield
    kernels.set_backend(old)


# ----- the ops: one runner for every op, backend, device and dtype ----------------------------------------------
def run(op: str, backend: str, inputs: list[torch.Tensor], dtype: torch.dtype, device, family="laplace",
        target: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Outputs and the gradients of every differentiable input (on the CPU, for comparison); `backend` 'ref' is
    the plain-torch reference."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs]
    ref = backend == "ref"
    if op == "mixture_logpdf":
        outs = (mixture_logpdf_ref(*leaves, family, True) if ref
                else mixture_logpdf_fused(*leaves, family, True, backend))
        if not ref:  # the logp-only call gives the same logp
            alone = mixture_logpdf_fused(*leaves, family, False, backend)
            assert alone[1] is None and alone[2] is None
            torch.testing.assert_close(alone[0], outs[0], rtol=0, atol=0)
    elif op == "moe_logq":
        outs = (moe_logq_ref(*leaves, family) if ref else moe_logq_fused(*leaves, family, backend),)
    elif op == "importance_weights":
        outs = importance_weights_ref(*leaves) if ref else importance_weights_fused(*leaves, backend)
    else:
        tgt = target.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        outs = (image_loglik_ref(*leaves, tgt, 0.3, family) if ref
                else image_loglik_fused(*leaves, tgt, 0.3, family, backend),)
    first = outs[0]
    upstream = torch.randn(first.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = torch.autograd.grad(first, leaves, upstream.to(device=device, dtype=first.dtype))
    return [t.detach().cpu() for t in (*outs, *grads)]


def _iw_inputs(m, s, b):
    lw = torch.randn(m, s, b, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 30 - 1e3
    if s > 1:
        lw[0, 0] = float("-inf")  # a sample with zero weight
    return [lw]


# (op, shape name) -> (inputs, image target); the CPU tests' shapes plus the training shapes and sizes that span
# several thread blocks, which only a real GPU launch exercises.
CASES = {
    **{("mixture_logpdf", k): (lambda v=v: (tk.mixture_inputs(*v), None)) for k, v in {
        **tk.MIXTURE_SHAPES, "n1": (1, 40, 32), "k1": (257, 1, 7), "blocks": (5003, 40, 33),
        "training": (6400, 40, 32)}.items()},
    **{("moe_logq", k): (lambda v=v: (tk.moe_inputs(*v), None)) for k, v in {
        **tk.MOE_SHAPES, "training": (5, 10, 128, 32), "blocks": (5, 1, 1001, 33)}.items()},
    **{("importance_weights", k): (lambda v=v: (_iw_inputs(*v), None)) for k, v in {
        **tk.IW_SHAPES, "training": (5, 10, 128), "blocks": (5, 1, 3001)}.items()},
    **{("image_loglik", k): (lambda v=v: (lambda p, t: ([p], t))(*tk.image_inputs(*v))) for k, v in {
        **tk.IMAGE_SHAPES, "training": ((5,), 128, 3, 28, 28)}.items()},
}


_TRUTHS: dict[tuple, list[torch.Tensor]] = {}
"""The fp64 CPU reference per (op, case, bf16-rounded inputs, family): shared by the backends and dtypes."""


def _compare(op, backend, case, dtype, family):
    inputs, target = CASES[op, case]()
    rounded = dtype == torch.bfloat16
    if rounded:  # the same bf16 values for everyone: the truth is computed from them
        inputs = [t.to(torch.bfloat16).double() for t in inputs]
        target = None if target is None else target.to(torch.bfloat16).double()
    key = (op, case, rounded, family)
    if key not in _TRUTHS:
        _TRUTHS[key] = run(op, "ref", inputs, torch.float64, "cpu", family, target)
    truth = _TRUTHS[key]
    got = run(op, backend, inputs, dtype, CUDA, family, target)
    if dtype == torch.float64:
        for i, (g, t) in enumerate(zip(got, truth, strict=True)):
            tk.check_fp64(g, t, f"{op} {case} fp64 [{i}]")
        return
    plain = run(op, "ref", inputs, dtype, CUDA, family, target)  # plain torch's own error at this precision
    for i, (g, t, p) in enumerate(zip(got, truth, plain, strict=True)):
        tk.check_lowp(g, t, p, f"{op} {case} {dtype} [{i}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [k[1] for k in CASES if k[0] == "mixture_logpdf"])
@pytest.mark.parametrize("family", tk.FAMILIES)
def test_mixture_logpdf_on_cuda(backend, case, dtype, family):
    _compare("mixture_logpdf", backend, case, dtype, family)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [k[1] for k in CASES if k[0] == "moe_logq"])
@pytest.mark.parametrize("family", tk.FAMILIES)
def test_moe_logq_on_cuda(backend, case, dtype, family):
    _compare("moe_logq", backend, case, dtype, family)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [k[1] for k in CASES if k[0] == "importance_weights"])
def test_importance_weights_on_cuda(backend, case, dtype):
    _compare("importance_weights", backend, case, dtype, "laplace")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [k[1] for k in CASES if k[0] == "image_loglik"])
@pytest.mark.parametrize("family", tk.FAMILIES)
def test_image_loglik_on_cuda(backend, case, dtype, family):
    _compare("image_loglik", backend, case, dtype, family)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("family", tk.FAMILIES)
def test_mixture_masked_clusters_and_far_points_on_cuda(backend, family):
    """Pruned clusters (log_pi = -inf) give exact zeros; points 60 units from every cluster stay finite."""
    masked = [0, 3, 6]
    logp, resp, ent, *grads = run("mixture_logpdf", backend, tk.mixture_inputs(29, 7, 5, seed=1, masked=masked),
                                  torch.float32, CUDA, family)
    assert all(torch.isfinite(t).all() for t in (logp, resp, ent, *grads))
    assert (resp[:, masked] == 0).all()
    assert all((g[masked] == 0).all() for g in grads[1:])
    far = tk.mixture_inputs(11, 6, 4, seed=2, far=60.0)
    truth = run("mixture_logpdf", "ref", far, torch.float64, "cpu", family)
    plain = run("mixture_logpdf", "ref", far, torch.float32, CUDA, family)
    for i, (g, t, p) in enumerate(zip(run("mixture_logpdf", backend, far, torch.float32, CUDA, family), truth, plain,
                                      strict=True)):
        assert torch.isfinite(g).all()
        tk.check_lowp(g, t, p, f"far [{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_on_cuda(backend, monkeypatch):
    """The registered ops (schemas, fake tensors, autograd registration) with CUDA inputs: the CPU tests' cases."""
    monkeypatch.setattr(tk, "_device", lambda _backend: "cuda")
    for op, args in tk._opcheck_cases(backend):
        assert all(a.device.type == CUDA.type for a in args if isinstance(a, torch.Tensor))
        torch.library.opcheck(op, args)


# ----- the compiled step ------------------------------------------------------------------------------------------
MODEL = dict(n_modalities=2, n_clusters=4, z_dim=8, w_dim=4, width=0.125)


def _step(compile: bool, backend: str) -> tuple[TrainStep, CMVAE]:
    kernels.set_backend(backend)
    torch.manual_seed(0)
    model = CMVAE(ModelConfig(**MODEL)).to(CUDA)
    opts = resolve_options(StepConfig(compile=compile, amp=False), CUDA)
    prepare_model(model, CMVAETask().networks(model), opts, CUDA)
    opt = build_optimizer([{"params": list(model.parameters())}], 1e-3, True, opts)
    return TrainStep(CMVAEObjective(model, "iwae", 1), opt, opts, CUDA), model


@pytest.mark.parametrize("backend", FUSED)
def test_compiled_step_is_one_graph_with_eager_gradients(backend, restore_backend):
    """torch.compile(fullgraph=True) of model + loss on CUDA (a graph break raises) gives eager's loss and
    gradients: fp32, the same random numbers (inductor's fallback_random); loss within 1e-5 relative, each
    parameter's gradient within 1e-3 of its own scale (cuDNN may pick other convolution algorithms)."""
    xb = torch.randint(0, 256, (2, 32, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    xb = xb.to(CUDA)
    results = []
    with torch._inductor.config.patch(fallback_random=True):
        for compile in (False, True):
            st, model = _step(compile, backend)
            torch.manual_seed(5)
            loss, _ = st.forward(xb, {"beta": torch.tensor(2.5, device=CUDA)})
            loss.backward()
            results.append((loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                          if p.grad is not None}))
            for i in range(3):  # and it steps
                st(xb, i + 1, {"beta": 2.5})
            assert int(st.stats.first_bad) == -1
    (eager_loss, eager_g), (comp_loss, comp_g) = results
    assert comp_loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager_g.keys() == comp_g.keys() and len(eager_g) > 10
    for name, g in eager_g.items():
        scale = max(g.abs().max().item(), 1e-12)
        assert (comp_g[name] - g).abs().max().item() <= 1e-3 * scale, name


# ----- loss curves through the loop ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def polydigits(tmp_path_factory):
    # 480 training tuples at batch 32: 15 full steps per epoch, 30 steps in 2 epochs (no partial batch, so the
    # compiled runs, which drop it, see the same batches)
    return synth_polydigits(tmp_path_factory.mktemp("data") / "pd2", n_modalities=2, n_train=480, n_valid=32,
                            n_test=64, seed=0)


def curve(data, out, kernels_backend="auto", **step) -> list[float]:
    """Per-step training losses of 30 steps of the engine's loop on CUDA."""
    cfg = TrainConfig(model=ModelConfig(n_clusters=4, z_dim=8, w_dim=4, width=0.125),
                      data=DataConfig(dataset=str(data)), optim=OptimConfig(epochs=2, batch_size=32),
                      step=StepConfig(**step), kernels=kernels_backend, device=CUDA.type, out=str(out), log_every=1,
                      eval_every=0, seed=3)
    assert train(cfg)["step"] == 30
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "step"]
    assert len(losses) == 30 and all(map(math.isfinite, losses))
    assert sum(losses[-5:]) < sum(losses[:5])  # it trained
    return losses


def test_fused_ops_on_and_off_give_the_same_curve(polydigits, tmp_path, restore_backend):
    """fp32, eager: the same random numbers either way, so only summation order differs; per-step losses within
    2e-4 relative (on the CPU, 6 steps differed by <= 4e-8; 30 Adam steps let rounding grow)."""
    off = curve(polydigits, tmp_path / "torch", "torch", amp=False)
    ran = 0
    for backend in ("triton", "ext"):
        if _reason(backend):
            continue
        assert curve(polydigits, tmp_path / backend, backend, amp=False) == pytest.approx(off, rel=2e-4), backend
        ran += 1
    assert ran, "neither triton nor the extension's CUDA kernels can run here"


def test_bf16_autocast_keeps_the_curve(polydigits, tmp_path):
    """bf16 networks, fp32 probabilistic core: per-step losses within 1e-2 relative of fp32 (bench train holds
    the mean loss to 2e-2; the CPU suite measured 6e-5 on epoch means of 6 steps), and not equal (it ran bf16)."""
    fp32 = curve(polydigits, tmp_path / "fp32", amp=False)
    bf16 = curve(polydigits, tmp_path / "bf16", amp=True)
    assert bf16 == pytest.approx(fp32, rel=1e-2)
    assert bf16 != pytest.approx(fp32, rel=1e-7)


def test_cuda_graphs_keep_the_curve(polydigits, tmp_path):
    """Compiled, with and without CUDA graph replay, against eager; fp32 and the same random numbers
    (fallback_random). Graphs replay the same kernels: within 1e-5 relative of the compiled run (cudnn.benchmark
    may choose other convolution algorithms per run); compiled against eager within 2e-4 (fused kernels reorder
    sums)."""
    eager = curve(polydigits, tmp_path / "eager", amp=False)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = curve(polydigits, tmp_path / "compiled", amp=False, compile=True)
        graphs = curve(polydigits, tmp_path / "graphs", amp=False, compile=True, cuda_graphs=True)
    assert graphs == pytest.approx(compiled, rel=1e-5)
    assert compiled == pytest.approx(eager, rel=2e-4)
