"""DReG's path-gradient weighting as autograd Functions: the same gradients as tensor hooks (an independent
construction, here in the test), any loss scale, and the DReG loss compiles as one graph."""

import pytest
import torch

from cmvae_engine import kernels
from cmvae_engine.cmvae import path_weights
from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.objectives import log_weights, loss_fn


def _model(dtype=torch.float64) -> CMVAE:
    torch.manual_seed(0)
    return CMVAE(ModelConfig(n_modalities=2, n_clusters=3, z_dim=4, w_dim=3, width=0.05)).to(dtype)


def _grads(model: CMVAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None}


def _hooked_dreg_loss(model: CMVAE, x: torch.Tensor, n_samples: int, beta: float, gen: torch.Generator):
    """DReG with tensor hooks on the samples (the formulation the Functions replace)."""
    post = model.encode(x)
    lat = model.sample_latents(post, n_samples, gen)
    lw = log_weights(model, x, post, lat, beta, detach_q=True).lw
    _, weights, _ = kernels.importance_weights(lw)
    for t in (lat.z, lat.w):
        t.register_hook(lambda g: g * weights[..., None])
    return -(weights * lw).sum(1).mean(0).sum()


@pytest.mark.parametrize("loss_scale", [1.0, 8.0])
def test_functions_give_the_hooks_gradients(loss_scale):
    model = _model()
    x = torch.rand(2, 3, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = _grads(model, loss_scale * loss_fn(model, x, objective="dreg", n_samples=4, beta=2.0,
                                              generator=torch.Generator().manual_seed(2)).loss)
    hooked = _grads(model, loss_scale * _hooked_dreg_loss(model, x, 4, 2.0, torch.Generator().manual_seed(2)))
    assert ours.keys() == hooked.keys()
    assert any(n.startswith("encoders") for n in ours)
    for name, g in ours.items():
        torch.testing.assert_close(g, hooked[name], rtol=1e-9, atol=1e-12, msg=name)


def test_tag_and_send_leave_values_and_scale_the_gradient():
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 3, 4, dtype=torch.float64)
    t2, token = path_weights.tag(t)
    assert torch.equal(t2, t) and torch.count_nonzero(token) == 0
    zero = path_weights.send(w, token)
    assert zero.item() == 0.0
    upstream = torch.randn_like(t)
    (g,) = torch.autograd.grad((t2 * upstream).sum() + zero, t)
    torch.testing.assert_close(g, upstream * w[..., None], rtol=0, atol=0)


def test_dreg_loss_compiles_as_one_graph():
    """fullgraph=True fails on any graph break (as the hooks caused); aot_eager also traces the backward, and
    its gradients equal eager's."""
    model = _model(torch.float32)
    x = torch.rand(2, 3, 3, 28, 28, generator=torch.Generator().manual_seed(3))

    def loss(xb):
        return loss_fn(model, xb, objective="dreg", n_samples=3).loss

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    got = _grads(model, compiled(x))
    torch.manual_seed(5)
    expect = _grads(model, loss(x))
    assert got.keys() == expect.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, expect[name], rtol=1e-4, atol=1e-5, msg=name)
