"""The fused ops' backwards compute only the gradients autograd asks for (needs_input_grad).

For every backend: gradients of the inputs that need one equal the plain-torch reference's (fp64) whatever
subset needs them; the backward op is called with the skip flags (so DReG's detached posterior parameters
pay for no reductions over samples); the backward ops return the skipped gradients empty and the others
unchanged; and a DReG loss on a tiny model asks moe_logq for no parameter gradient.
"""

import importlib

import pytest
import torch

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.objectives import loss_fn
from cmvae_engine.kernels import backends
from cmvae_engine.kernels.mixture_logpdf import mixture_logpdf_fused, mixture_logpdf_ref
from cmvae_engine.kernels.moe_logq import moe_logq_fused, moe_logq_ref

# The modules (the package re-exports functions of the same names).
mix_mod = importlib.import_module("cmvae_engine.kernels.mixture_logpdf")
moe_mod = importlib.import_module("cmvae_engine.kernels.moe_logq")
FAMILIES = ["laplace", "normal"]


def _reason(backend: str) -> str:
    if backend == "triton":
        return backends.triton_unavailable_reason("cuda" if torch.cuda.is_available() else "cpu")
    return backends.ext_unavailable_reason() if backend == "ext" else ""


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(bool(_reason(b)), reason=f"{b} backend: {_reason(b)}"))
            for b in ("torch", "triton", "ext")]


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _moe_inputs(dev: str, gen: torch.Generator):
    z = torch.randn(3, 2, 5, 4, dtype=torch.float64, generator=gen).to(dev)
    loc = torch.randn(3, 5, 4, dtype=torch.float64, generator=gen).to(dev)
    scale = (torch.rand(3, 5, 4, dtype=torch.float64, generator=gen) + 0.5).to(dev)
    return z, loc, scale


def _mix_inputs(dev: str, gen: torch.Generator):
    z = torch.randn(9, 4, dtype=torch.float64, generator=gen).to(dev)
    loc = torch.randn(3, 4, dtype=torch.float64, generator=gen).to(dev)
    scale = (torch.rand(3, 4, dtype=torch.float64, generator=gen) + 0.5).to(dev)
    log_pi = torch.log_softmax(torch.randn(3, dtype=torch.float64, generator=gen), 0).to(dev)
    return z, loc, scale, log_pi


class _Spy:
    """Wraps a module's backward op and records the skip flags of each call."""

    def __init__(self, monkeypatch, module, name: str):
        self.calls: list[tuple] = []
        inner = getattr(module, name)

        def spy(*args):
            self.calls.append(args[-2:] if module is mix_mod else args[-1:])
            return inner(*args)

        monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wanted", [(0,), (0, 1, 2), (1,), (2,)])
def test_moe_logq_gradients_of_any_subset(backend, family, wanted, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    xs = _moe_inputs(_device(backend), gen)
    leaves = [x.clone().requires_grad_(i in wanted) for i, x in enumerate(xs)]
    spy = _Spy(monkeypatch, moe_mod, "moe_logq_backward_op")
    out = moe_logq_fused(*leaves, family, backend)
    g = torch.randn(out.shape, dtype=out.dtype, generator=gen).to(out.device)
    ours = torch.autograd.grad(out, [leaves[i] for i in wanted], g)
    refs = [x.clone().requires_grad_(i in wanted) for i, x in enumerate(xs)]
    expect = torch.autograd.grad(moe_logq_ref(*refs, family), [refs[i] for i in wanted], g)
    for a, b in zip(ours, expect, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert spy.calls == [(1 in wanted or 2 in wanted,)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wanted", [(0,), (1, 2, 3), (0, 3), (2,)])
def test_mixture_logpdf_gradients_of_any_subset(backend, family, wanted, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    xs = _mix_inputs(_device(backend), gen)
    leaves = [x.clone().requires_grad_(i in wanted) for i, x in enumerate(xs)]
    spy = _Spy(monkeypatch, mix_mod, "mixture_logpdf_backward_op")
    logp = mixture_logpdf_fused(*leaves, family, False, backend)[0]
    g = torch.randn(logp.shape, dtype=logp.dtype, generator=gen).to(logp.device)
    ours = torch.autograd.grad(logp, [leaves[i] for i in wanted], g)
    refs = [x.clone().requires_grad_(i in wanted) for i, x in enumerate(xs)]
    expect = torch.autograd.grad(mixture_logpdf_ref(*refs, family)[0], [refs[i] for i in wanted], g)
    for a, b in zip(ours, expect, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert spy.calls == [(0 in wanted, any(i in wanted for i in (1, 2, 3)))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_backward_ops_return_skipped_gradients_empty(backend, family):
    gen = torch.Generator().manual_seed(7)
    lap = family == "laplace"
    z, loc, scale = _moe_inputs(_device(backend), gen)
    out = moe_mod.moe_logq_op(z, loc, scale, lap, backend)
    g = torch.randn(out.shape, dtype=out.dtype, generator=gen).to(out.device)
    full = moe_mod.moe_logq_backward_op(g, z, loc, scale, out, lap, backend, True)
    part = moe_mod.moe_logq_backward_op(g, z, loc, scale, out, lap, backend, False)
    torch.testing.assert_close(part[0], full[0], rtol=0, atol=0)
    assert full[1].shape == loc.shape and part[1].numel() == 0 and part[2].numel() == 0

    xs = _mix_inputs(_device(backend), gen)
    logp = mix_mod.mixture_logpdf_op(*xs, lap, False, backend)[0]
    g = torch.randn(logp.shape, dtype=logp.dtype, generator=gen).to(logp.device)
    full = mix_mod.mixture_logpdf_backward_op(g, *xs, logp, lap, backend, True, True)
    only_z = mix_mod.mixture_logpdf_backward_op(g, *xs, logp, lap, backend, True, False)
    only_p = mix_mod.mixture_logpdf_backward_op(g, *xs, logp, lap, backend, False, True)
    torch.testing.assert_close(only_z[0], full[0], rtol=0, atol=1e-12)
    assert all(t.numel() == 0 for t in only_z[1:]) and only_p[0].numel() == 0
    for a, b in zip(only_p[1:], full[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_dreg_asks_moe_logq_for_no_parameter_gradient(monkeypatch):
    """Under DReG the posterior parameters are detached in log q: the backward skips their reductions, while
    the IWAE objective (same model) still asks for them."""
    cfg = ModelConfig(n_modalities=2, n_clusters=3, z_dim=4, w_dim=2, width=0.05)
    torch.manual_seed(0)
    model = CMVAE(cfg)
    x = torch.rand(2, 3, 3, 28, 28)
    spy = _Spy(monkeypatch, moe_mod, "moe_logq_backward_op")
    fused = backends.ext_unavailable_reason() == ""
    for objective, expect in (("dreg", False), ("iwae", True)):
        spy.calls.clear()
        loss_fn(model, x, objective=objective, n_samples=2).loss.backward()
        # The torch backend (no extension built) differentiates the reference directly, without the op.
        assert spy.calls == ([(expect,)] if fused else [])
