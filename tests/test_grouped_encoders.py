"""The 2M encoder towers as one grouped computation equal the per-tower calls (values and every gradient), keep
the model's state_dict, and are what the step option switches."""

import pytest
import torch

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.objectives import loss_fn
from cmvae_engine.engine.config import StepConfig
from cmvae_engine.engine.step import resolve_options
from cmvae_engine.engine.tasks.cmvae_task import CMVAETask


def _model(channels: int = 3, z_dim: int = 5, w_dim: int = 3, dtype=torch.float64) -> CMVAE:
    torch.manual_seed(0)
    cfg = ModelConfig(n_modalities=3, n_clusters=4, z_dim=z_dim, w_dim=w_dim, width=0.1, image_channels=channels)
    return CMVAE(cfg).to(dtype)


def _posterior_and_grads(model: CMVAE, x: torch.Tensor, batched: bool, weights: list[torch.Tensor]):
    model.zero_grad(set_to_none=True)
    post = model.encode(x, batched=batched)
    outs = (post.z_loc, post.z_scale, post.w_loc, post.w_scale)
    sum((o * w).sum() for o, w in zip(outs, weights, strict=True)).backward()
    return outs, {n: p.grad.clone() for n, p in model.encoders.named_parameters()}


@pytest.mark.parametrize("channels,z_dim,w_dim", [(3, 5, 3), (1, 4, 4)])
def test_grouped_encoders_equal_per_tower_values_and_gradients(channels, z_dim, w_dim):
    model = _model(channels, z_dim, w_dim)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 6, channels, 28, 28, generator=gen, dtype=torch.float64)
    shapes = [(3, 6, z_dim)] * 2 + [(3, 6, w_dim)] * 2
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ref_out, ref_grads = _posterior_and_grads(model, x, False, weights)
    out, grads = _posterior_and_grads(model, x, True, weights)
    for a, b in zip(out, ref_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)
        assert g.abs().sum() > 0, name  # every tower's parameters get their own gradient slice


def test_grouped_encoders_fp32_and_channels_last_to_rounding():
    model = _model(dtype=torch.float32)
    x = torch.rand(3, 4, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    ref = model.encode(x, batched=False)
    model.to(memory_format=torch.channels_last)
    got = model.encode(x, batched=True)
    for name in ("z_loc", "z_scale", "w_loc", "w_scale"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-4, atol=1e-5, msg=name)


def test_grouped_encoders_add_no_state():
    model = _model()
    keys = list(model.state_dict())
    assert not any("grouped" in k for k in keys)
    assert "grouped_encoders" not in dict(model.named_modules())
    n_params = sum(p.numel() for p in model.parameters())
    other = CMVAE(model.config).to(torch.float64)
    other.load_state_dict(model.state_dict())  # the same layout loads either way
    assert sum(p.numel() for p in other.parameters()) == n_params
    x = torch.rand(3, 2, 3, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(other.encode(x, batched=True).z_loc, model.encode(x, batched=False).z_loc)


def test_loss_and_gradients_unchanged_by_the_option():
    model = _model()
    x = torch.rand(3, 4, 3, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for batched in (False, True):
        model.batch_encoders = batched
        model.zero_grad(set_to_none=True)
        out = loss_fn(model, x, objective="iwae", n_samples=2, generator=torch.Generator().manual_seed(4))
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-9)
    assert len(g0) == len(g1)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_step_option_reaches_the_model():
    # Unset, each device gets its measured choice: grouped encoders and batched decoders on CUDA, the reference's
    # separate calls on CPU; an explicit setting wins on either.
    assert StepConfig().batch_encoders is None and StepConfig().decode_per_pair is None
    model = _model()
    for device, grouped in ((torch.device("cpu"), False), (torch.device("cuda"), True)):
        opts = resolve_options(StepConfig(), device)
        CMVAETask().prepare(model, opts)
        assert model.batch_encoders is grouped and model.decode_per_pair is (not grouped)
    for value in (False, True):
        for device in (torch.device("cpu"), torch.device("cuda")):
            opts = resolve_options(StepConfig(batch_encoders=value, decode_per_pair=value), device)
            CMVAETask().prepare(model, opts)
            assert model.batch_encoders is value and model.decode_per_pair is value
    names = [name for name, _ in CMVAETask().networks(model)]
    assert "encoders (grouped)" in names
