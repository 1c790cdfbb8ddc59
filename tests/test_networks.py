import pytest
import torch

from cmvae_engine.cmvae import CMVAE, ModelConfig
from cmvae_engine.cmvae.networks import Decoder, Encoder, count_parameters, macs_per_sample


def test_reference_parameter_counts():
    assert count_parameters(Encoder(32, 32)) == 2_946_048
    assert count_parameters(Decoder(32, 32)) == 1_485_251
    model = CMVAE(ModelConfig(n_modalities=5))
    nets = sum(count_parameters(m) for m in (*model.encoders, *model.decoders))
    assert nets == 22_156_495


def test_reference_macs():
    full, quarter = macs_per_sample(1.0), macs_per_sample(0.25)
    assert full["tower_z"] == pytest.approx(106.5e6, rel=1e-3)
    assert full["decoder"] == pytest.approx(106.5e6, rel=1e-3)
    assert quarter["decoder"] == pytest.approx(7.06e6, rel=1e-3)


@pytest.mark.parametrize("width", [0.125, 0.25, 0.5])
def test_reduced_width_shapes(width):
    enc, dec = Encoder(16, 8, width), Decoder(16, 8, width)
    x = torch.rand(3, 3, 28, 28)
    z_loc, z_raw, w_loc, w_raw = enc(x)
    assert z_loc.shape == z_raw.shape == (3, 16)
    assert w_loc.shape == w_raw.shape == (3, 8)
    assert dec(torch.cat([w_loc, z_loc], -1)).shape == (3, 3, 28, 28)
    assert count_parameters(enc) < 2_946_048 * width
    assert ModelConfig(width=width).reduced


def test_width_must_be_positive():
    with pytest.raises(ValueError, match="width"):
        ModelConfig(width=0)
