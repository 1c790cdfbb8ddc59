"""The CUBICC networks: parameter counts against the reference's, shapes, the caption likelihood and the image
likelihood against torch.distributions, and the BatchNorm handling of decoders across source modalities."""

from __future__ import annotations

import pytest
import torch

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.hetero import HeteroCMVAE, caption_loglik
from cmvae_engine.cmvae.modalities import Modalities
from cmvae_engine.cmvae.networks import count_parameters
from cmvae_engine.cmvae.networks_cub import CaptionDecoder, CaptionEncoder, CubImageDecoder, CubImageEncoder
from cmvae_engine.cmvae.objectives import loss_fn


def conv(cin, cout, kh, kw=None, bias=True):
    return cin * cout * kh * (kw or kh) + (cout if bias else 0)


def block(fin, fout):  # the reference's ResnetBlock: two biased 3x3 convs, 1x1 shortcut without bias if fin != fout
    hidden = min(fin, fout)
    return conv(fin, hidden, 3) + conv(hidden, fout, 3) + (fin * fout if fin != fout else 0)


def lin(i, o):
    return i * o + o


# Expected counts, worked out by hand from the reference's architecture (CMVAE release bcb4a15:
# src/models/encoder_decoder_blocks/resnet_cub_image.py and cnn_cub_text.py, Dz = 64, Dw = 32, vocabulary 1590,
# sentence length 32, embedding 128, fBase 32; BatchNorm layers count their weight and bias):
# image tower: conv 3->64, RB(64,64), RB(64,128), RB(128,256), 3 x RB(256,256); heads from 256*2*2
IMAGE_TOWER = conv(3, 64, 3) + block(64, 64) + block(64, 128) + block(128, 256) + 3 * block(256, 256)
IMAGE_ENCODER = 2 * IMAGE_TOWER + 2 * lin(1024, 32) + 2 * lin(1024, 64)
IMAGE_DECODER = (lin(96, 1024) + 3 * block(256, 256) + block(256, 128) + block(128, 64) + block(64, 64)
                 + conv(64, 3, 3))
TEXT_W = conv(1, 32, 4) + 64 + conv(32, 64, 4) + 128 + conv(64, 128, 4) + 256
TEXT_Z = TEXT_W + conv(128, 256, 1, 4) + 512 + conv(256, 512, 1, 4) + 1024
TEXT_ENCODER = lin(1590, 128) + TEXT_W + 2 * lin(32 * 16 * 16, 32) + TEXT_Z + 2 * conv(512, 64, 4)
TEXT_DECODER = (conv(32, 512, 4) + 1024 + conv(512, 256, 1, 4) + 512 + conv(256, 128, 1, 4) + 256
                + conv(64, 512, 4) + 1024 + conv(512, 256, 1, 4) + 512 + conv(256, 256, 3) + 512
                + conv(256, 128, 1, 4) + 256
                + conv(256, 128, 3) + 256 + conv(128, 64, 4) + 128 + conv(64, 32, 4) + 64 + conv(32, 1, 4)
                + lin(128, 1590))


def test_parameter_counts_are_the_reference():
    assert (IMAGE_ENCODER, IMAGE_DECODER, TEXT_ENCODER, TEXT_DECODER) == (8_618_048, 4_309_699, 2_764_416, 3_358_167)
    assert count_parameters(CubImageEncoder(64, 32)) == IMAGE_ENCODER
    assert count_parameters(CubImageDecoder(64, 32)) == IMAGE_DECODER
    assert count_parameters(CaptionEncoder(64, 32, 1590)) == TEXT_ENCODER
    assert count_parameters(CaptionDecoder(64, 32, 1590)) == TEXT_DECODER


def test_shapes_at_reduced_width():
    enc, dec = CubImageEncoder(16, 8, 32, 0.125), CubImageDecoder(16, 8, 32, 0.125)
    z_loc, z_raw, w_loc, w_raw = enc(torch.rand(3, 3, 32, 32))
    assert z_loc.shape == z_raw.shape == (3, 16) and w_loc.shape == w_raw.shape == (3, 8)
    assert dec(torch.randn(3, 24)).shape == (3, 3, 32, 32)
    tenc, tdec = CaptionEncoder(16, 8, 20, 16, 0.125), CaptionDecoder(16, 8, 20, 16, 0.125)
    assert [t.shape for t in tenc(torch.randint(0, 20, (3, 16)))] == [(3, 16), (3, 16), (3, 8), (3, 8)]
    assert tdec(torch.randn(3, 24)).shape == (3, 16, 20)


def test_embedding_lookup_is_the_one_hot_linear():
    enc = CaptionEncoder(8, 8, 20, 16, 0.125)
    tokens = torch.randint(0, 20, (4, 16))
    onehot = torch.nn.functional.one_hot(tokens, 20).float()
    torch.testing.assert_close(enc.tower_z.embed(tokens), enc.tower_z.embed.linear(onehot))


def test_caption_loglik_is_one_hot_categorical():
    logits = torch.randn(2, 3, 4, 8, 11)
    tokens = torch.randint(0, 11, (4, 8))
    onehot = torch.nn.functional.one_hot(tokens, 11).float()
    expected = torch.distributions.OneHotCategorical(probs=logits.softmax(-1)).log_prob(onehot).sum(-1)
    torch.testing.assert_close(caption_loglik(logits, tokens), expected, rtol=1e-5, atol=1e-4)


SPECS = [{"kind": "image", "channels": 3, "size": 32, "likelihood": "laplace", "likelihood_scale": 0.01,
          "llik_scaling": 0.125},
         {"kind": "text", "length": 16, "vocab_size": 20, "pad_id": 0, "end_id": 1, "llik_scaling": 5.0}]


def _model():
    torch.manual_seed(0)
    return HeteroCMVAE(ModelConfig(n_modalities=2, z_dim=8, w_dim=4, width=0.125, family="normal", modalities=SPECS))


def _batch(b=5):
    return Modalities([torch.rand(b, 3, 32, 32), torch.randint(0, 20, (b, 16))])


def test_reconstruction_loglik_against_torch_distributions():
    model, x = _model(), _batch()
    recons = [torch.rand(2, 3, 5, 3, 32, 32), torch.randn(2, 3, 5, 16, 20)]
    img = torch.distributions.Laplace(recons[0], 0.01).log_prob(x[0]).flatten(3).sum(-1) * 0.125
    txt = torch.distributions.Categorical(logits=recons[1]).log_prob(x[1]).sum(-1) * 5.0
    torch.testing.assert_close(model.reconstruction_loglik(recons, x), img + txt, rtol=1e-5, atol=1e-2)


def test_batchnorm_decoders_are_called_per_source():
    model, lat_shape = _model().train(), (2, 3, 5)
    z, w_self, w_aux = torch.randn(*lat_shape, 8), torch.randn(3, 5, 4), torch.randn(*lat_shape, 4)
    per_source = model.decode_target(1, z, w_self, w_aux)
    pairs = torch.stack([model.decode_pair(1, z[0], w_aux[0]), model.decode_pair(1, z[1], w_self)])  # target 1
    torch.testing.assert_close(per_source, pairs)
    # one call over both sources normalises with other statistics in training mode: not the same values
    batched = model.decoders[1](torch.cat([torch.stack([w_aux[0], w_self]), z], -1).flatten(0, -2)).view_as(pairs)
    assert (batched - pairs).abs().max() > 1e-3
    model.eval()  # running statistics: the two agree
    batched = model.decoders[1](torch.cat([torch.stack([w_aux[0], w_self]), z], -1).flatten(0, -2)).view_as(pairs)
    torch.testing.assert_close(model.decode_target(1, z, w_self, w_aux), batched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["iwae", "dreg"])
def test_objective_runs_and_trains_every_network(objective):
    model, x = _model(), _batch()
    out = loss_fn(model, x, objective=objective, n_samples=3, beta=1.0)
    assert out.bound.shape == (5,) and torch.isfinite(out.loss)
    out.loss.backward()
    for name, net in (("enc0", model.encoders[0]), ("enc1", model.encoders[1]), ("dec0", model.decoders[0]),
                      ("dec1", model.decoders[1])):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()), name


def test_generation_gives_images_and_token_ids():
    model = _model().eval()
    s = model.generate(3, cluster=0)
    assert s[0].shape == (3, 3, 32, 32) and s[0].min() >= 0 and s[0].max() <= 1
    assert s[1].shape == (3, 16) and s[1].dtype == torch.int64 and int(s[1].max()) < 20
    c = model.generate_conditional(_batch(3)[0], source=0)
    assert c[1].shape == (3, 16)


def test_step_flops_count_every_network_per_source():
    from cmvae_engine.engine.hetero_cost import _macs, hetero_step_flops

    cfg = _model().config
    inputs = (torch.zeros(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.long))
    enc = [_macs(e, x) for e, x in zip(_model().encoders, inputs, strict=True)]
    dec = [_macs(d, torch.zeros(1, 12)) for d in _model().decoders]
    # by hand for the caption decoder's last layer: Linear(128 -> 20) on 16 positions
    assert dec[1] > 16 * 128 * 20
    expected = 6.0 * (4 * sum(enc) + 4 * 3 * 2 * sum(dec))  # batch 4, S 3, M 2 sources per target
    assert hetero_step_flops(cfg, 4, 3) == expected


def test_modalities_index_like_a_stacked_tensor():
    from cmvae_engine.cmvae.clustering import to_float
    from cmvae_engine.engine.loaders import ResidentLoader, stack_modalities

    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    tokens = torch.randint(0, 20, (6, 16))
    x = Modalities([images, tokens])
    assert x.shape[:2] == (2, 6) and x[1] is tokens
    assert torch.equal(x[:, 2:4][0], images[2:4]) and torch.equal(x[1, 3:], tokens[3:])
    idx = torch.tensor([5, 0])
    assert torch.equal(x.index_select(1, idx)[1], tokens[idx])
    f = to_float(x)
    assert f[0].dtype == torch.float32 and float(f[0].max()) <= 1.0 and f[1].dtype == torch.int64
    stacked = stack_modalities([images.numpy(), tokens.numpy()])
    assert isinstance(stacked, Modalities) and torch.equal(stacked[1], tokens)
    assert isinstance(stack_modalities([images.numpy(), images.numpy()]), torch.Tensor)  # alike images: one tensor
    loader = ResidentLoader(x, batch_size=4, seed=0)
    batches = list(loader.epoch(0))
    assert [b.shape[1] for b in batches] == [4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, tokens.tolist()))  # every tuple once, aligned
    rows = {tuple(t.tolist()): i for i, t in enumerate(tokens)}
    for b in batches:
        for img, tok in zip(b[0], b[1], strict=True):
            assert torch.equal(img, images[rows[tuple(tok.tolist())]])
