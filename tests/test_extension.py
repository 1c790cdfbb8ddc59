"""The C++ extension's CPU ops (kernels/csrc/) against the plain-torch references: values and gradients.

The extension is built (or found up to date) once per session; a machine that cannot build it fails these tests,
since CI has a compiler. float64 results must match the reference to rounding; float32 results must be about as
close to a float64 reference as torch's own float32 computation is.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import pytest
import torch

from cmvae_engine.kernels import extension
from cmvae_engine.kernels import extension_build as eb
from cmvae_engine.kernels.image_nll import image_loglik_ref
from cmvae_engine.kernels.importance_weights import importance_weights_ref
from cmvae_engine.kernels.mixture_logpdf import mixture_logpdf_ref
from cmvae_engine.kernels.moe_logq import moe_logq_ref

FAMILIES = ("laplace", "normal")
DTYPES = (torch.float64, torch.float32)


@pytest.fixture(scope="module")
def ext():
    if extension.available():  # built and up to date (tools/setup.sh builds it)
        return extension
    try:
        extension.build()
    except eb.BuildError as e:
        pytest.fail(f"the C++ extension does not build here: {e}")
    assert extension.available(), extension.unavailable_reason()
    return extension


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_matches(ours: torch.Tensor, ref32: torch.Tensor | None, ref64: torch.Tensor, what: str) -> None:
    """float64: equal to rounding. float32: error against the float64 reference within 4x torch's own float32
    error (floored at a few ulps of the largest value, where torch happens to be exact)."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == (ref32.dtype if ref32 is not None else ref64.dtype), f"{what}: dtype {ours.dtype}"
    scale = 1.0 + ref64.abs().max().item() if ref64.numel() else 1.0
    if ref32 is None:
        torch.testing.assert_close(ours, ref64, rtol=1e-10, atol=1e-10 * scale, msg=what)
        return
    err = (ours.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    torch_err = (ref32.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    tol = max(4 * torch_err, 8 * torch.finfo(torch.float32).eps * scale)
    assert err <= tol, f"{what}: error {err:.3g} vs torch float32's {torch_err:.3g} (tolerance {tol:.3g})"


def _grads(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out.detach(), [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves, strict=True)]


# ----- mixture_logpdf ------------------------------------------------------------------------------------------
def _mixture_inputs(n: int, k: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = _gen(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5
    loc = torch.rand(k, d, generator=g, dtype=torch.float64) * 2 - 1
    scale = torch.rand(k, d, generator=g, dtype=torch.float64) * 1.5 + 0.3
    log_pi = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    return [t.to(dtype) for t in (z, loc, scale, log_pi)]


def _check_mixture(ext, inputs, family: str, dtype: torch.dtype) -> None:
    lap = family == "laplace"
    n = inputs[0].shape[0]
    grad = torch.randn(n, generator=_gen(1), dtype=torch.float64).to(dtype)
    ours_lp, ours_r, ours_h = ext.mixture_logpdf_fwd(*inputs, lap, True)
    ours_g = ext.mixture_logpdf_bwd(grad, *inputs, ours_lp, lap)
    refs = {}
    for dt in {dtype, torch.float64}:
        xs = [t.to(dt) for t in inputs]
        lp, r, h = mixture_logpdf_ref(*xs, family, True)
        _, g = _grads(lambda *a: mixture_logpdf_ref(*a, family)[0], xs, grad.to(dt))  # noqa: B023
        refs[dt] = (lp, r, h, *g)
    ref32 = refs[dtype] if dtype != torch.float64 else [None] * 7
    names = ("logp", "resp", "entropy", "g_z", "g_loc", "g_scale", "g_log_pi")
    for name, ours, r32, r64 in zip(names, (ours_lp, ours_r, ours_h, *ours_g), ref32, refs[torch.float64],
                                    strict=True):
        assert_matches(ours, r32, r64, f"mixture_logpdf {family} {dtype} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 4), (7, 1, 3), (123, 37, 33), (6, 1024, 5)], ids=str)
def test_mixture_matches_reference(ext, shape, family, dtype):
    _check_mixture(ext, _mixture_inputs(*shape, dtype), family, dtype)


def test_mixture_without_posterior_returns_empty_tensors(ext):
    z, loc, scale, log_pi = _mixture_inputs(5, 3, 2, torch.float32)
    logp, resp, ent = ext.mixture_logpdf_fwd(z, loc, scale, log_pi, True, False)
    assert logp.shape == (5,) and resp.numel() == 0 and ent.numel() == 0
    torch.testing.assert_close(logp, mixture_logpdf_ref(z, loc, scale, log_pi, "laplace")[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_mixture_masked_clusters_give_exact_zeros(ext, family):
    z, loc, scale, log_pi = _mixture_inputs(40, 6, 5, torch.float32)
    log_pi = log_pi.clone()
    log_pi[[1, 4]] = -math.inf
    lap = family == "laplace"
    logp, resp, ent = ext.mixture_logpdf_fwd(z, loc, scale, log_pi, lap, True)
    g_z, g_loc, g_scale, g_pi = ext.mixture_logpdf_bwd(torch.ones(40), z, loc, scale, log_pi, logp, lap)
    for t in (logp, resp, ent, g_z, g_loc, g_scale, g_pi):
        assert torch.isfinite(t).all()
    assert (resp[:, [1, 4]] == 0).all()
    assert (g_loc[[1, 4]] == 0).all() and (g_scale[[1, 4]] == 0).all() and (g_pi[[1, 4]] == 0).all()
    _check_mixture(ext, [z, loc, scale, log_pi], family, torch.float32)
    # One live cluster: the posterior is certain, its entropy exactly zero.
    only = torch.full((6,), -math.inf)
    only[2] = 0.0
    _, resp1, ent1 = ext.mixture_logpdf_fwd(z, loc, scale, only, lap, True)
    assert (resp1[:, 2] == 1).all() and (resp1.sum(1) == 1).all() and (ent1 == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_mixture_far_away_z_is_finite_and_exact(ext, family):
    z, loc, scale, log_pi = _mixture_inputs(20, 7, 4, torch.float64)
    z = z + 1e3 * torch.sign(torch.randn(20, 4, generator=_gen(3), dtype=torch.float64))
    _check_mixture(ext, [z, loc, scale, log_pi], family, torch.float64)
    lap = family == "laplace"
    z32, loc32, scale32, pi32 = (t.float() for t in (z, loc, scale, log_pi))
    logp, resp, ent = ext.mixture_logpdf_fwd(z32, loc32, scale32, pi32, lap, True)
    grads = ext.mixture_logpdf_bwd(torch.ones(20), z32, loc32, scale32, pi32, logp, lap)
    for t in (logp, resp, ent, *grads):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(resp.sum(1), torch.ones(20))


def test_mixture_threads_agree(ext):
    # 2000 rows x (8 x 16) gives the backward two tasks with two threads (a task is >= 256 rows here).
    z, loc, scale, log_pi = _mixture_inputs(2000, 8, 16, torch.float32)
    grad = torch.randn(2000, generator=_gen(2))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fwd = ext.mixture_logpdf_fwd(z, loc, scale, log_pi, True, True)
            results.append((*fwd, *ext.mixture_logpdf_bwd(grad, z, loc, scale, log_pi, fwd[0], True)))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)


# ----- moe_logq ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (3, 4, 5, 7, 3), (2, 3, 6, 33, 5)], ids=str)
def test_moe_matches_reference(ext, shape, family, dtype):
    m, s, b, d, e = shape
    g = _gen(4)
    z = torch.randn(m, s, b, d, generator=g, dtype=torch.float64)
    loc = torch.randn(e, b, d, generator=g, dtype=torch.float64) * 0.5
    scale = torch.rand(e, b, d, generator=g, dtype=torch.float64) + 0.4
    grad = torch.randn(m, s, b, generator=g, dtype=torch.float64).to(dtype)
    lap = family == "laplace"
    xs = [t.to(dtype) for t in (z, loc, scale)]
    out = ext.moe_logq_fwd(*xs, lap)
    ours = (out, *ext.moe_logq_bwd(grad.to(dtype), *xs, out, lap))
    refs = {dt: _grads(lambda *a: moe_logq_ref(*a, family), [t.to(dt) for t in xs], grad.to(dt))  # noqa: B023
            for dt in {dtype, torch.float64}}
    ref64 = (refs[torch.float64][0], *refs[torch.float64][1])
    ref32 = (refs[dtype][0], *refs[dtype][1]) if dtype != torch.float64 else (None,) * 4
    for name, o, r32, r64 in zip(("out", "g_z", "g_loc", "g_scale"), ours, ref32, ref64, strict=True):
        assert_matches(o, r32, r64, f"moe_logq {family} {dtype} {name}")


# ----- importance_weights ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 10, 7), (3, 1, 4), (2, 130, 3)], ids=str)
def test_importance_weights_match_reference(ext, shape, dtype):
    g = _gen(5)
    lw = torch.randn(*shape, generator=g, dtype=torch.float64) * 30 - 500
    if shape[1] > 1:
        lw[0, 0, :] = -math.inf  # a sample with zero weight
    lw = lw.to(dtype).double()  # the references see the values the op sees
    grad = torch.randn(shape[2], generator=g, dtype=torch.float64).to(dtype).double()
    bound, w, sq = ext.importance_weights_fwd(lw.to(dtype))
    g_lw = ext.importance_weights_bwd(grad.to(dtype), w)
    refs = {}
    for dt in {dtype, torch.float64}:
        x = lw.to(dt).requires_grad_()
        b_ref, w_ref, sq_ref = importance_weights_ref(x)
        (g_ref,) = torch.autograd.grad(b_ref, x, grad.to(dt))
        refs[dt] = (b_ref.detach(), w_ref, sq_ref, g_ref)
    ref32 = refs[dtype] if dtype != torch.float64 else (None,) * 4
    for name, o, r32, r64 in zip(("bound", "weights", "sq_weights", "g_lw"), (bound, w, sq, g_lw), ref32,
                                 refs[torch.float64], strict=True):
        assert_matches(o, r32, r64, f"importance_weights {dtype} {name}")


# ----- image_loglik ------------------------------------------------------------------------------------------
def _image_ref(pred: torch.Tensor, target: torch.Tensor, scale: float, family: str) -> torch.Tensor:
    """The reference takes [..., B, C, H, W]; view the pixel axis as C=P, H=W=1."""
    return image_loglik_ref(pred[..., None, None], target[..., None, None], scale, family)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 37), (2, 4, 2352)], ids=str)
def test_image_loglik_matches_reference(ext, shape, family, dtype):
    r, b, p = shape
    g = _gen(6)
    target = torch.rand(b, p, generator=g, dtype=torch.float64)
    pred = target + 0.3 * torch.randn(r, b, p, generator=g, dtype=torch.float64)
    grad = torch.randn(r, b, generator=g, dtype=torch.float64)
    target, pred, grad = (t.to(dtype).double() for t in (target, pred, grad))  # what the op sees
    lap, scale = family == "laplace", 0.75
    out = ext.image_loglik_fwd(pred.to(dtype), target.to(dtype), scale, lap)
    g_pred = ext.image_loglik_bwd(grad.to(dtype), pred.to(dtype), target.to(dtype), scale, lap)
    refs = {}
    for dt in {dtype, torch.float64}:
        o, (gp, _) = _grads(lambda x, t: _image_ref(x, t, scale, family), [pred.to(dt), target.to(dt)],  # noqa: B023
                            grad.to(dt))
        refs[dt] = (o, gp)
    ref32 = refs[dtype] if dtype != torch.float64 else (None, None)
    for name, o, r32, r64 in zip(("out", "g_pred"), (out, g_pred), ref32, refs[torch.float64], strict=True):
        assert_matches(o, r32, r64, f"image_loglik {family} {dtype} {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_image_loglik_bf16_pred_accumulates_in_fp32(ext, family):
    g = _gen(7)
    target = torch.rand(4, 2352, generator=g)
    pred = (target + 0.2 * torch.randn(3, 4, 2352, generator=g)).bfloat16()
    grad = torch.randn(3, 4, generator=g)
    lap = family == "laplace"
    out = ext.image_loglik_fwd(pred, target, 0.75, lap)
    g_pred = ext.image_loglik_bwd(grad, pred, target, 0.75, lap)
    assert out.dtype == torch.float32 and g_pred.dtype == torch.bfloat16
    # Against the same bf16 values upcast to float64: only the float32 accumulation differs; g_pred is within one
    # bf16 rounding step (float32 and float64 products can round to neighbouring bf16 values).
    o64, (gp64, _) = _grads(lambda x, t: _image_ref(x, t, 0.75, family), [pred.double(), target.double()],
                            grad.double())
    torch.testing.assert_close(out.double(), o64, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g_pred.double(), gp64, rtol=2**-8, atol=1e-30)


# ----- argument checks ----------------------------------------------------------------------------------------
def test_bad_arguments_name_the_argument(ext):
    z, loc, scale, log_pi = _mixture_inputs(4, 3, 2, torch.float32)
    with pytest.raises(RuntimeError, match="mixture_logpdf_fwd: 'scale' must have the shape of 'loc'"):
        ext.mixture_logpdf_fwd(z, loc, scale[:, :1], log_pi, True, False)
    with pytest.raises(RuntimeError, match="'log_pi' has 2 entries but 'loc' has K = 3"):
        ext.mixture_logpdf_fwd(z, loc, scale, log_pi[:2], True, False)
    with pytest.raises(RuntimeError, match="'z' must be a floating tensor"):
        ext.mixture_logpdf_fwd(z.long(), loc, scale, log_pi, True, False)
    with pytest.raises(RuntimeError, match=r"mixture_logpdf_bwd: 'logp' must have shape \[4\]"):
        ext.mixture_logpdf_bwd(torch.ones(4), z, loc, scale, log_pi, torch.zeros(3), True)
    with pytest.raises(RuntimeError, match=r"moe_logq_fwd: 'z' must have shape \[M, S, B, D\]"):
        ext.moe_logq_fwd(z, loc, scale, True)
    with pytest.raises(RuntimeError, match="image_loglik_fwd: 'scale' must be a positive finite float"):
        ext.image_loglik_fwd(torch.zeros(1, 2, 3), torch.zeros(2, 3), 0.0, True)
    with pytest.raises(RuntimeError, match=r"importance_weights_fwd: 'lw' must have shape \[M, S, B\]"):
        ext.importance_weights_fwd(torch.zeros(2, 3))


# ----- build tooling ----------------------------------------------------------------------------------------------
def test_stale_builds_are_recognised(tmp_path):
    assert "no build stamp" in eb.stale_reason(tmp_path)
    (tmp_path / eb.STAMP_FILE).write_text(f'{{"torch": "0.0.1", "sources": "{eb.sources_digest()}"}}')
    assert "built for torch 0.0.1" in eb.stale_reason(tmp_path)
    (tmp_path / eb.STAMP_FILE).write_text(f'{{"torch": "{torch.__version__}", "sources": "abc"}}')
    assert "sources changed" in eb.stale_reason(tmp_path)
    (tmp_path / eb.STAMP_FILE).write_text(f'{{"torch": "{torch.__version__}", "sources": "{eb.sources_digest()}"}}')
    assert eb.stale_reason(tmp_path) == ""


def _load_build_tool():
    path = Path(__file__).resolve().parent.parent / "tools" / "build_extension.py"
    spec = importlib.util.spec_from_file_location("build_extension_tool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_tool_without_cmake_says_so_and_exits_0_unless_strict(monkeypatch, capsys):
    tool = _load_build_tool()
    monkeypatch.setattr(tool.extension_build, "_tool", lambda name: None)
    assert tool.main([]) == 0
    err = capsys.readouterr().err
    assert "C++ extension not built: no CMake found" in err and "torch backend" in err
    assert tool.main(["--strict"]) == 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the CUDA sources")
def test_cuda_sources_compile_with_nvcc():
    # A CPU-only torch cannot link or run them; this catches compile errors (~35 s of CPU the first time).
    build_dir = eb.check_cuda_sources()
    objects = list(build_dir.rglob("*.o"))
    assert objects and all(o.stat().st_size > 0 for o in objects)
