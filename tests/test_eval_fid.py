"""The FID Inception from a local weights file (randomly initialised here, made in the test): no network
access, the same features as pytorch-fid's own InceptionV3, clear refusals."""

import socket

import pytest
import torch

from cmvae_engine.cmvae.evaluation import fid


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download (pytorch-fid's default) or open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    pfi = fid.import_pytorch_fid_inception()
    monkeypatch.setattr(pfi, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / fid.FID_WEIGHTS_FILE
    torch.save(fid.fid_inception_structure().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8, generator=g)


def test_features_equal_pytorch_fid_inception(weights_file, images, monkeypatch):
    net = fid.load_fid_inception(weights_file)
    ours = fid.inception_features(net, images, batch_size=2)
    assert ours.shape == (3, fid.FID_DIMS) and torch.isfinite(ours).all() and (ours >= 0).all()
    # pytorch-fid's own network, its download replaced by our file: the features must match.
    pfi = fid.import_pytorch_fid_inception()
    monkeypatch.setattr(pfi, "load_state_dict_from_url",
                        lambda *a, **k: torch.load(weights_file, weights_only=True))
    theirs = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.no_grad():
        ref = theirs(images.float() / 255.0)[0].flatten(1)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_quantize_rounds_like_a_png_writer():
    x = torch.tensor([0.0, 0.5 / 255, 0.499 / 255, 1.0, 1.2, -0.1, 0.5])
    assert fid.quantize(x).tolist() == [0, 1, 0, 255, 255, 0, 128]


def test_weights_are_found_near_the_data(weights_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    data = tmp_path / "data" / "polymnist"
    data.mkdir(parents=True)
    assert fid.find_inception_weights(data) is None
    (tmp_path / "data" / "PolyMNIST").mkdir()
    (tmp_path / "data" / "PolyMNIST" / fid.FID_WEIGHTS_FILE).symlink_to(weights_file)
    assert fid.find_inception_weights(data) == tmp_path / "data" / "PolyMNIST" / fid.FID_WEIGHTS_FILE


def test_missing_or_foreign_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        fid.load_fid_inception(tmp_path / "absent.pth")
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match="not the FID Inception weights"):
        fid.load_fid_inception(other)


def test_too_few_samples_are_refused():
    with pytest.raises(ValueError, match="at least 2048"):
        fid.check_sample_count(2000, "the test split", fid.MIN_SAMPLES)
    fid.check_sample_count(2048, "the test split", fid.MIN_SAMPLES)
