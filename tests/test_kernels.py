"""Every backend of the fused ops against the plain-torch references: values and all gradients, awkward
shapes, masked clusters, far-away z, bf16 inputs, opcheck, and the backend choice.

Backends under test: `torch` (the op's own plain-torch formulas), `triton` (Triton's interpreter on CPU: tests/
conftest.py sets TRITON_INTERPRET=1; real kernels where CUDA is present) and `ext` (the C++ extension). A backend
that cannot run here is skipped with its reason. Interpreter shapes stay small: it runs each tile operation as
a numpy call (an odd 123 x 37 x 33 mixture forward+backward takes ~1 s).

Precision rules: fp64 results must match the fp64 reference to 1e-10 of the quantity's scale. fp32 and bf16
results are judged against the fp64 reference relative to plain torch's own error at that precision on the
same inputs (within 8x, plus a floor of a few fp32 ulps of the quantity's scale).
"""

import pytest
import torch

from cmvae_engine import kernels
from cmvae_engine.kernels import backends, dispatch
from cmvae_engine.kernels.image_nll import (
    image_loglik_backward_op,
    image_loglik_fused,
    image_loglik_op,
    image_loglik_ref,
)
from cmvae_engine.kernels.importance_weights import (
    importance_weights_backward_op,
    importance_weights_fused,
    importance_weights_op,
    importance_weights_ref,
)
from cmvae_engine.kernels.mixture_logpdf import (
    mixture_logpdf_backward_op,
    mixture_logpdf_fused,
    mixture_logpdf_op,
    mixture_logpdf_ref,
)
from cmvae_engine.kernels.moe_logq import moe_logq_backward_op, moe_logq_fused, moe_logq_op, moe_logq_ref

FAMILIES = ["laplace", "normal"]
CUDA = torch.cuda.is_available()


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and CUDA else "cpu"


def _unavailable(backend: str) -> str:
    if backend == "triton":
        return backends.triton_unavailable_reason(_device("triton"))
    return backends.ext_unavailable_reason() if backend == "ext" else ""


def _param(backend: str):
    reason = _unavailable(backend)
    return pytest.param(backend, marks=pytest.mark.skipif(bool(reason), reason=f"{backend} backend: {reason}"))


FUSED = [_param(b) for b in ("torch", "triton", "ext")]


@pytest.fixture
def restore_backend():
    old = kernels.get_backend()
    yield
    kernels.set_backend(old)


# ----- helpers -------------------------------------------------------------------------------------------------
def _scale_of(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return max(1.0, finite.abs().max().item()) if finite.numel() else 1.0


def check_fp64(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.float64, what
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10 * _scale_of(ref), equal_nan=False, msg=what)


def check_lowp(got: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, what: str) -> None:
    """got vs the fp64 reference within 8x plain torch's own error at that precision (same inputs)."""
    assert torch.isfinite(got).all() == torch.isfinite(ref64).all(), what
    err = (got.double() - ref64).abs().max().item()
    torch_err = (torch_lowp.double() - ref64).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * _scale_of(ref64)
    assert err <= 8 * torch_err + floor, f"{what}: error {err:.3g} vs plain torch {torch_err:.3g} (floor {floor:.3g})"


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], upstream: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, upstream.to(out.dtype)))


def _leaf(t: torch.Tensor, device: str) -> torch.Tensor:
    return t.detach().to(device).requires_grad_()


# ----- mixture_logpdf ------------------------------------------------------------------------------------------
def mixture_inputs(n, k, d, seed=0, far=0.0, masked=()):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) + far
    loc = torch.rand(k, d, generator=g, dtype=torch.float64) * 2 - 1
    scale = torch.rand(k, d, generator=g, dtype=torch.float64) * 1.5 + 0.25
    log_pi = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    log_pi[list(masked)] = float("-inf")
    return [z, loc, scale, log_pi]


def run_mixture(backend, inputs, family, dtype):
    """(logp, resp, entropy, g_z, g_loc, g_scale, g_log_pi) of `backend` ('ref' = the reference)."""
    device = _device(backend) if backend != "ref" else "cpu"
    leaves = [_leaf(t.to(dtype), device) for t in inputs]
    if backend == "ref":
        logp, resp, ent = mixture_logpdf_ref(*leaves, family, with_posterior=True)
    else:
        logp, resp, ent = mixture_logpdf_fused(*leaves, family, True, backend)
        logp_only, none_resp, none_ent = mixture_logpdf_fused(*leaves, family, False, backend)
        assert none_resp is None and none_ent is None
        torch.testing.assert_close(logp_only, logp, rtol=0, atol=0)
    upstream = torch.linspace(-1.0, 2.0, logp.shape[0], dtype=torch.float64).to(device)
    grads = _grads(logp, leaves, upstream)
    return [t.detach().cpu() for t in (logp, resp, ent, *grads)]


MIXTURE_NAMES = ("logp", "resp", "entropy", "g_z", "g_loc", "g_scale", "g_log_pi")
MIXTURE_SHAPES = {"ones": (1, 1, 1), "odd": (123, 37, 33), "large_k": (6, 1024, 4), "small": (17, 5, 3)}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", list(MIXTURE_SHAPES))
def test_mixture_logpdf_matches_reference(backend, family, shape):
    inputs = mixture_inputs(*MIXTURE_SHAPES[shape])
    ref64 = run_mixture("ref", inputs, family, torch.float64)
    for name, got, ref in zip(MIXTURE_NAMES, run_mixture(backend, inputs, family, torch.float64), ref64, strict=True):
        check_fp64(got, ref, f"fp64 {name}")
    ref32 = run_mixture("ref", inputs, family, torch.float32)
    got32 = run_mixture(backend, inputs, family, torch.float32)
    for name, got, ref, base in zip(MIXTURE_NAMES, got32, ref64, ref32, strict=True):
        assert got.dtype == torch.float32
        check_lowp(got, ref, base, f"fp32 {name}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("family", FAMILIES)
def test_mixture_logpdf_masked_clusters_are_exact_zeros(backend, family):
    masked = (0, 3, 6)
    inputs = mixture_inputs(29, 7, 5, seed=1, masked=masked)
    logp, resp, ent, g_z, g_loc, g_scale, g_log_pi = run_mixture(backend, inputs, family, torch.float32)
    for t in (logp, resp, ent, g_z, g_loc, g_scale, g_log_pi):
        assert torch.isfinite(t).all()
    assert (resp[:, list(masked)] == 0).all()
    assert (g_loc[list(masked)] == 0).all() and (g_scale[list(masked)] == 0).all()
    assert (g_log_pi[list(masked)] == 0).all()
    torch.testing.assert_close(resp.sum(1), torch.ones(29), rtol=0, atol=1e-5)
    ref = run_mixture("ref", inputs, family, torch.float64)
    torch.testing.assert_close(ent.double(), ref[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("family", FAMILIES)
def test_mixture_logpdf_far_from_every_cluster(backend, family):
    """z 60 units from every cluster: joint densities around -1e3 (Laplace) to -1e5 (Normal), all finite."""
    inputs = mixture_inputs(11, 6, 4, seed=2, far=60.0)
    ref64 = run_mixture("ref", inputs, family, torch.float64)
    assert torch.isfinite(ref64[0]).all() and ref64[0].max() < -200
    ref32 = run_mixture("ref", inputs, family, torch.float32)
    for name, got, ref, base in zip(MIXTURE_NAMES, run_mixture(backend, inputs, family, torch.float32), ref64, ref32,
                                    strict=True):
        assert torch.isfinite(got).all(), name
        check_lowp(got, ref, base, f"far {name}")


@pytest.mark.parametrize("backend", FUSED)
def test_mixture_logpdf_bf16_inputs(backend):
    """bf16 inputs are computed in fp32: closer to the fp64 truth than plain torch in bf16."""
    inputs = [t.to(torch.bfloat16).double() for t in mixture_inputs(33, 9, 16, seed=3)]
    ref64 = run_mixture("ref", inputs, "laplace", torch.float64)
    ref16 = run_mixture("ref", inputs, "laplace", torch.bfloat16)
    got = run_mixture(backend, inputs, "laplace", torch.bfloat16)
    assert got[0].dtype == torch.float32 and got[3].dtype == torch.bfloat16
    for name, g, ref, base in zip(MIXTURE_NAMES, got, ref64, ref16, strict=True):
        check_lowp(g, ref, base, f"bf16 {name}")


# ----- moe_logq --------------------------------------------------------------------------------------------------
def moe_inputs(m, s, b, d, e=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = m if e is None else e
    z = torch.randn(m, s, b, d, generator=g, dtype=torch.float64)
    loc = torch.randn(e, b, d, generator=g, dtype=torch.float64) * 0.5
    scale = torch.rand(e, b, d, generator=g, dtype=torch.float64) + 0.3
    return [z, loc, scale]


def run_moe(backend, inputs, family, dtype):
    device = _device(backend) if backend != "ref" else "cpu"
    leaves = [_leaf(t.to(dtype), device) for t in inputs]
    out = moe_logq_ref(*leaves, family) if backend == "ref" else moe_logq_fused(*leaves, family, backend)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)
    return [t.detach().cpu() for t in (out, *_grads(out, leaves, upstream))]


MOE_NAMES = ("log_q", "g_z", "g_loc", "g_scale")
MOE_SHAPES = {"ones": (1, 1, 1, 1), "odd": (3, 2, 123, 33), "samples": (5, 10, 7, 4), "experts_ne_m": (2, 3, 9, 5, 3)}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", list(MOE_SHAPES))
def test_moe_logq_matches_reference(backend, family, shape):
    inputs = moe_inputs(*MOE_SHAPES[shape])
    ref64 = run_moe("ref", inputs, family, torch.float64)
    for name, got, ref in zip(MOE_NAMES, run_moe(backend, inputs, family, torch.float64), ref64, strict=True):
        check_fp64(got, ref, f"fp64 {name}")
    ref32 = run_moe("ref", inputs, family, torch.float32)
    for name, got, ref, base in zip(MOE_NAMES, run_moe(backend, inputs, family, torch.float32), ref64, ref32,
                                    strict=True):
        check_lowp(got, ref, base, f"fp32 {name}")


@pytest.mark.parametrize("backend", FUSED)
def test_moe_logq_far_samples(backend):
    inputs = moe_inputs(3, 2, 5, 4, seed=4)
    inputs[0] = inputs[0] + 80.0
    ref64 = run_moe("ref", inputs, "normal", torch.float64)
    ref32 = run_moe("ref", inputs, "normal", torch.float32)
    for name, got, ref, base in zip(MOE_NAMES, run_moe(backend, inputs, "normal", torch.float32), ref64, ref32,
                                    strict=True):
        assert torch.isfinite(got).all(), name
        check_lowp(got, ref, base, f"far {name}")


# ----- importance_weights --------------------------------------------------------------------------------------
def run_iw(backend, lw, dtype):
    device = _device(backend) if backend != "ref" else "cpu"
    leaf = _leaf(lw.to(dtype), device)
    bound, w, sq = importance_weights_ref(leaf) if backend == "ref" else importance_weights_fused(leaf, backend)
    assert not w.requires_grad and not sq.requires_grad
    upstream = torch.linspace(-1.0, 1.0, bound.shape[0], dtype=torch.float64).to(device)
    return [t.detach().cpu() for t in (bound, w, sq, *_grads(bound, [leaf], upstream))]


IW_NAMES = ("bound", "weights", "sq_weights", "g_lw")
IW_SHAPES = {"ones": (1, 1, 1), "odd": (3, 2, 123), "samples": (5, 10, 7), "many_samples": (2, 1000, 3)}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", list(IW_SHAPES))
def test_importance_weights_match_reference(backend, shape):
    lw = torch.randn(*IW_SHAPES[shape], generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 30 - 1e3
    if lw.shape[1] > 1:
        lw[0, 0] = float("-inf")  # a sample with zero weight
    ref64 = run_iw("ref", lw, torch.float64)
    for name, got, ref in zip(IW_NAMES, run_iw(backend, lw, torch.float64), ref64, strict=True):
        check_fp64(got, ref, f"fp64 {name}")
    ref32 = run_iw("ref", lw, torch.float32)
    for name, got, ref, base in zip(IW_NAMES, run_iw(backend, lw, torch.float32), ref64, ref32, strict=True):
        check_lowp(got, ref, base, f"fp32 {name}")


# ----- image_loglik --------------------------------------------------------------------------------------------
def image_inputs(lead, b, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 256, (b, c, h, w), generator=g).double() / 255
    pred = torch.rand(*lead, b, c, h, w, generator=g, dtype=torch.float64) * 1.2 - 0.1
    return pred, target


def run_image(backend, pred, target, family, dtype, scale=0.3):
    device = _device(backend) if backend != "ref" else "cpu"
    leaf = _leaf(pred.to(dtype), device)
    tgt = target.to(torch.float32 if dtype != torch.float64 else dtype).to(device)
    out = (image_loglik_ref(leaf, tgt, scale, family) if backend == "ref"
           else image_loglik_fused(leaf, tgt, scale, family, backend))
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device)
    return [t.detach().cpu() for t in (out, *_grads(out, [leaf], upstream))]


IMAGE_SHAPES = {"one_pixel": ((), 1, 1, 1, 1), "samples": ((2, 3), 3, 3, 28, 28), "odd": ((1,), 3, 1, 7, 5)}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", list(IMAGE_SHAPES))
def test_image_loglik_matches_reference(backend, family, shape):
    pred, target = image_inputs(*IMAGE_SHAPES[shape])
    ref64 = run_image("ref", pred, target, family, torch.float64)
    for name, got, ref in zip(("loglik", "g_pred"), run_image(backend, pred, target, family, torch.float64), ref64,
                              strict=True):
        check_fp64(got, ref, f"fp64 {name}")
    ref32 = run_image("ref", pred, target, family, torch.float32)
    for name, got, ref, base in zip(("loglik", "g_pred"), run_image(backend, pred, target, family, torch.float32),
                                    ref64, ref32, strict=True):
        check_lowp(got, ref, base, f"fp32 {name}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("family", FAMILIES)
def test_image_loglik_bf16_pred(backend, family):
    """bf16 decoder outputs: the sum is accumulated in fp32 (fp32 output), the gradient comes back in bf16;
    both at least as close to the fp64 truth (targets rounded to bf16 as the reference does) as plain torch."""
    pred, target = image_inputs((2,), 3, 3, 28, 28, seed=7)
    pred16 = pred.to(torch.bfloat16)
    ref64 = run_image("ref", pred16.double(), target.to(torch.bfloat16).double(), family, torch.float64)
    ref16 = run_image("ref", pred16.double(), target, family, torch.bfloat16)
    got = run_image(backend, pred16.double(), target, family, torch.bfloat16)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for name, g, ref, base in zip(("loglik", "g_pred"), got, ref64, ref16, strict=True):
        check_lowp(g, ref, base, f"bf16 {name}")


def test_image_loglik_rejects_mismatched_target():
    with pytest.raises(ValueError, match="must end with target's shape"):
        image_loglik_fused(torch.zeros(2, 3, 1, 4, 4), torch.zeros(3, 1, 4, 5), 0.75, "laplace", "torch")


# ----- opcheck ---------------------------------------------------------------------------------------------------
def _opcheck_cases(backend):
    dev = _device(backend)
    z, loc, scale, log_pi = (t.float().to(dev) for t in mixture_inputs(7, 3, 5, masked=(1,)))
    mz, mloc, mscale = (t.float().to(dev) for t in moe_inputs(2, 3, 4, 5))
    lw = torch.randn(2, 3, 4, device=dev)
    pred, target = (t.float().to(dev) for t in image_inputs((2,), 3, 1, 4, 4))
    pred = pred.reshape(2, 3, 16)
    target = target.reshape(3, 16)
    grad = dict(requires_grad=True)
    return [
        (mixture_logpdf_op, (z.clone().requires_grad_(), loc.clone().requires_grad_(), scale.clone().requires_grad_(),
                             log_pi.clone().requires_grad_(), True, True, backend)),
        (mixture_logpdf_op, (z, loc, scale, log_pi, False, False, backend)),
        (moe_logq_op, (mz.clone().requires_grad_(), mloc.clone().requires_grad_(), mscale.clone().requires_grad_(),
                       False, backend)),
        (importance_weights_op, (lw.clone().requires_grad_(), backend)),
        (image_loglik_op, (pred.clone().requires_grad_(), target, 0.75, True, backend)),
        (image_loglik_op, (torch.randn(1, 2, 3, device=dev, **grad), torch.randn(2, 3, device=dev), 0.5, False,
                           backend)),
        # the backward ops, which compiled backward graphs call
        (mixture_logpdf_backward_op, (torch.randn(7, device=dev), z, loc, scale, log_pi,
                                      mixture_logpdf_op(z, loc, scale, log_pi, True, False, backend)[0], True,
                                      backend)),
        (moe_logq_backward_op, (torch.randn(2, 3, 4, device=dev), mz, mloc, mscale,
                                moe_logq_op(mz, mloc, mscale, False, backend), False, backend)),
        (importance_weights_backward_op, (torch.randn(4, device=dev), importance_weights_op(lw, backend)[1], backend)),
        (image_loglik_backward_op, (torch.randn(2, 3, device=dev), pred, target, 0.75, True, backend)),
    ]


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    for op, args in _opcheck_cases(backend):
        torch.library.opcheck(op, args)


# ----- the backend choice ---------------------------------------------------------------------------------------
def test_torch_backend_is_exactly_the_reference(restore_backend):
    kernels.set_backend("torch")
    z, loc, scale, log_pi = mixture_inputs(9, 4, 3)
    out = kernels.mixture_logpdf(z, loc, scale, log_pi, "laplace", with_posterior=True)
    for got, ref in zip(out, mixture_logpdf_ref(z, loc, scale, log_pi, "laplace", True), strict=True):
        assert torch.equal(got, ref)
    lw = torch.randn(2, 3, 4)
    assert all(torch.equal(a, b) for a, b in zip(kernels.importance_weights(lw), importance_weights_ref(lw),
                                                  strict=True))
    mz, mloc, mscale = moe_inputs(2, 2, 3, 4)
    assert torch.equal(kernels.moe_logq(mz, mloc, mscale, "normal"), moe_logq_ref(mz, mloc, mscale, "normal"))
    pred, target = image_inputs((2,), 3, 1, 4, 4)
    assert torch.equal(kernels.image_loglik(pred, target, 0.75, "laplace"),
                       image_loglik_ref(pred, target, 0.75, "laplace"))


def test_auto_picks_the_extension_on_cpu_when_built(restore_backend):
    kernels.set_backend("auto")
    expected = "torch" if backends.ext_unavailable_reason() else "ext"
    assert kernels.active_backend("cpu") == expected


def test_bad_backend_requests_are_clear_errors(restore_backend, monkeypatch):
    with pytest.raises(ValueError, match="expected one of auto|torch|triton|ext"):
        kernels.set_backend("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="CMVAE_KERNELS='fast'"):
        dispatch._initial_request()
    if backends.ext_unavailable_reason():
        with pytest.raises(ValueError, match="extension is unavailable"):
            kernels.set_backend("ext")
    from cmvae_engine.engine.config import TrainConfig

    with pytest.raises(ValueError, match="--kernels"):
        TrainConfig(kernels="fast")


def test_train_cli_rejects_an_unknown_kernel_backend(tmp_path):
    from typer.testing import CliRunner

    from cmvae_engine.engine.cli import app

    result = CliRunner().invoke(app, ["train", "polydigits", "--kernels", "fast", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--kernels" in result.output and "fast" in result.output


def test_environment_variable_selects_the_backend(restore_backend, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    dispatch._initial_request()
    assert kernels.get_backend() == "torch" and kernels.active_backend("cpu") == "torch"


def test_explicit_backend_is_used_for_every_op(restore_backend, monkeypatch):
    """With a fused backend requested, the public functions go through the ops (seen by the lookups)."""
    fused = next((b for b in ("ext", "triton") if not _unavailable(b)), None)
    if fused is None:
        pytest.skip("neither the extension nor Triton can run here")
    kernels.set_backend(fused)
    seen = []
    real = backends.lookup
    monkeypatch.setattr(backends, "lookup", lambda op, b, kind, local: seen.append((op, b)) or real(op, b, kind, local))
    dev = _device(fused)
    z, loc, scale, log_pi = (t.float().to(dev) for t in mixture_inputs(5, 3, 2))
    kernels.mixture_logpdf(z, loc, scale, log_pi, "laplace")
    kernels.moe_logq(*(t.float().to(dev) for t in moe_inputs(2, 1, 3, 2)), "laplace")
    kernels.importance_weights(torch.randn(2, 2, 3, device=dev))
    kernels.image_loglik(*(t.float().to(dev) for t in image_inputs((1,), 2, 1, 2, 2)), 0.75, "laplace")
    assert {op for op, _ in seen} == set(backends.OPS) and {b for _, b in seen} == {fused}

