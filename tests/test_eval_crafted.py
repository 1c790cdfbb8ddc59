"""Evaluation measures on crafted models and data whose answer is known beforehand: a model whose z names the
cluster of each datapoint exactly, a z that encodes the label (probe accuracy 1) or only part of it (a known
fraction), a w that carries nothing (chance), and generators whose images a crafted classifier reads exactly."""

import numpy as np
import pytest
import torch
from torch import nn

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.evaluation.classifier import ClassifierSet
from cmvae_engine.cmvae.evaluation.clustering import clustering_evaluation
from cmvae_engine.cmvae.evaluation.coherence import conditional_coherence, unconditional_coherence
from cmvae_engine.cmvae.evaluation.latent_probe import latent_classification
from cmvae_engine.cmvae.model import CMVAE, Posterior

N_CLASSES = 10
STEP = 20
"""A crafted image shows label l as the value l * STEP in every pixel (uint8)."""


def label_images(labels: np.ndarray, m_count: int) -> torch.Tensor:
    """uint8 [M, N, 1, 28, 28]: every pixel of every modality of tuple i holds labels[i] * STEP."""
    vals = torch.as_tensor(np.asarray(labels) * STEP, dtype=torch.uint8)
    return vals.view(1, -1, 1, 1, 1).expand(m_count, -1, 1, 28, 28).contiguous()


def read_labels(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] [..., C, H, W] (as label_images, decoded) -> the label they show [...]."""
    return (x[..., 0, 0, 0] * 255.0 / STEP).round().long()


class PixelClassifier(nn.Module):
    """Returns the label an image shows (one-hot logits): a classifier whose every output is known."""

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift
        self.encoder = nn.Sequential(nn.Linear(1, N_CLASSES))  # out_features: the class count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot((read_labels(x) + self.shift) % N_CLASSES, N_CLASSES).float()


class CraftedEncoder(CMVAE):
    """encode() reads each tuple's label from its pixels and returns, per modality, z and w locations given by
    the functions `z_of(m, labels)` [N, Dz] and `w_of(m, labels)` [N, Dw], with tiny scales."""

    def __init__(self, config: ModelConfig, z_of, w_of):
        super().__init__(config)
        self.z_of, self.w_of = z_of, w_of

    def encode(self, x: torch.Tensor) -> Posterior:
        y = read_labels(x[0])
        m_count = x.shape[0]
        z = torch.stack([self.z_of(m, y) for m in range(m_count)]).float()
        w = torch.stack([self.w_of(m, y) for m in range(m_count)]).float()
        return Posterior(z, torch.full_like(z, 1e-4), w, torch.full_like(w, 1e-4))


def balanced(n: int) -> np.ndarray:
    return np.arange(n) % N_CLASSES


# ----- clustering --------------------------------------------------------------------------------------------
@pytest.fixture
def cluster_model():
    """K = 12, well-separated prior means; label l is cluster perm[l] (clusters 10 and 11 get no data under the
    label map). m0 and m1 place z on the mean of the label's cluster; m2 puts every tuple on cluster 11."""
    k, dz = 12, 4
    g = torch.Generator().manual_seed(0)
    model = CMVAE(ModelConfig(n_modalities=3, n_clusters=k, z_dim=dz, w_dim=2, width=0.0625))
    perm = torch.randperm(11, generator=g)[:N_CLASSES]  # ten distinct clusters among 0..10
    with torch.no_grad():
        model.prior_loc.copy_(torch.arange(k, dtype=torch.float32)[:, None] * 25.0 * torch.ones(1, dz))

    def z_of(m, y):
        cluster = perm[y] if m < 2 else torch.full_like(y, 11)
        return model.prior_loc.detach()[cluster]

    crafted = CraftedEncoder(model.config, z_of, lambda m, y: torch.zeros(len(y), 2))
    crafted.load_state_dict(model.state_dict())
    return crafted.eval(), perm


def test_clustering_of_a_model_whose_z_names_the_cluster(cluster_model):
    model, perm = cluster_model
    labels = balanced(100)
    out = clustering_evaluation(model, label_images(labels, 3), labels, batch_size=30,
                                generator=torch.Generator().manual_seed(0))
    # m0 and m1 recover the labels up to the names of the clusters; m2 puts everything in one cluster.
    for m in ("m0", "m1"):
        assert out["per_modality"][m] == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0), "acc": 1.0,
                                          "n_clusters": 10}
    assert out["per_modality"]["m2"] == {"nmi": pytest.approx(0.0, abs=1e-12), "ari": pytest.approx(0.0),
                                         "acc": 0.1, "n_clusters": 1}
    # the majority vote follows the two modalities that agree
    assert out["vote"]["acc"] == 1.0 and out["vote"]["nmi"] == pytest.approx(1.0)
    assert out["active_clusters"] == 12
    # the vote's cluster x label counts: cluster perm[l] holds the 10 tuples of label l
    clusters = sorted(perm.tolist())
    assert out["confusion"]["clusters"] == clusters and out["confusion"]["labels"] == list(range(10))
    assert out["confusion"]["counts"] == [[10 if perm[j] == c else 0 for j in range(10)] for c in clusters]


def test_clustering_counts_only_active_clusters(cluster_model):
    model, perm = cluster_model
    unused = (set(range(11)) - set(perm.tolist())).pop()  # no label maps there, and m2 uses cluster 11
    with torch.no_grad():
        model.cluster_active[unused] = False
    labels = balanced(50)
    out = clustering_evaluation(model, label_images(labels, 3), labels)
    assert out["active_clusters"] == 11 and out["vote"]["acc"] == 1.0


# ----- latent probe ------------------------------------------------------------------------------------------
def probe_model():
    """z of m0 is the label one-hot (probe accuracy 1); z of m1 is the one-hot for labels 0-4 and one shared
    point for 5-9 (accuracy 0.5 + 0.1 on balanced data); every w is the same constant (chance, 0.1)."""
    cfg = ModelConfig(n_modalities=2, n_clusters=10, z_dim=N_CLASSES, w_dim=3, width=0.0625)

    def z_of(m, y):
        hot = nn.functional.one_hot(y, N_CLASSES).float() * 3.0
        if m == 1:
            hot[y >= 5] = 0.0
        return hot

    return CraftedEncoder(cfg, z_of, lambda m, y: torch.ones(len(y), 3)).eval()


def test_latent_probe_gives_the_known_accuracies():
    y_train, y_test = balanced(200), balanced(100)
    out = latent_classification(probe_model(), label_images(y_train, 2), y_train, label_images(y_test, 2), y_test,
                                n_train=None, n_test=None, seed=0)
    assert out["z"]["m0"] == 1.0
    assert out["z"]["m1"] == pytest.approx(0.6)
    assert out["z"]["mean"] == pytest.approx(0.8)
    assert out["w"]["m0"] == pytest.approx(0.1) and out["w"]["m1"] == pytest.approx(0.1)
    assert out["chance"] == pytest.approx(0.1) and out["n_train"] == 200 and out["n_test"] == 100


def test_latent_probe_of_a_z_independent_of_the_label_is_at_chance():
    # z is the same for every datapoint: nothing to learn, the probe predicts one class everywhere.
    cfg = ModelConfig(n_modalities=2, n_clusters=10, z_dim=4, w_dim=2, width=0.0625)
    model = CraftedEncoder(cfg, lambda m, y: torch.full((len(y), 4), 2.0), lambda m, y: torch.zeros(len(y), 2))
    y = balanced(120)
    out = latent_classification(model.eval(), label_images(y, 2), y, label_images(y, 2), y, n_train=None,
                                n_test=None)
    assert out["z"]["mean"] == pytest.approx(0.1) and out["w"]["mean"] == pytest.approx(0.1)


# ----- conditional generation: the diagonal is a self-reconstruction -------------------------------------------
class WTellingModel(CMVAE):
    """Every encoder returns w locations of 100 (its own w is far from the prior's); every decoder draws 0.8
    where the w it got has mean above 50 (the source's own w), else 0.2 (a prior draw)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        dz, dw = config.z_dim, config.w_dim

        class Enc(nn.Module):
            def __init__(self):
                super().__init__()
                self.p = nn.Parameter(torch.zeros(()))

            def forward(self, x):
                b = x.shape[0]
                return (torch.zeros(b, dz), torch.zeros(b, dz), torch.full((b, dw), 100.0), torch.zeros(b, dw))

        self.encoders = nn.ModuleList(Enc() for _ in range(config.n_modalities))

    def decode_pair(self, n, z, w):
        own = (w.mean(-1) > 50).float()
        return (0.2 + 0.6 * own)[..., None, None, None].expand(*w.shape[:-1], 1, 28, 28)


def test_conditional_generation_decodes_the_source_with_its_own_w_only_when_asked():
    model = WTellingModel(ModelConfig(n_modalities=3, n_clusters=4, z_dim=4, w_dim=6, width=0.0625)).eval()
    x = torch.rand(5, 1, 28, 28)
    for source in range(3):
        gen = model.generate_conditional(x, source, generator=torch.Generator().manual_seed(0), own_w=True)
        assert gen.shape == (3, 5, 1, 28, 28)
        for t in range(3):
            assert torch.allclose(gen[t], torch.full_like(gen[t], 0.8 if t == source else 0.2))
        plain = model.generate_conditional(x, source, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(plain, torch.full_like(plain, 0.2))


# ----- coherence of a crafted generator ----------------------------------------------------------------------
CORRECT_OF = [[5, 1, 2], [3, 4, 0], [2, 5, 3]]
"""Of every 5 tuples, how many the pair source -> target draws with the right label: coherence is this / 5."""


def indexed_images(labels: np.ndarray, m_count: int) -> torch.Tensor:
    """label_images, with pixel (0, 1) holding (tuple index % 5) * STEP."""
    x = label_images(labels, m_count).clone()
    x[:, :, 0, 0, 1] = torch.as_tensor((np.arange(len(labels)) % 5) * STEP, dtype=torch.uint8)
    return x


class CraftedGenerator(CMVAE):
    """generate_conditional draws, for target t, an image showing the tuple's label when its index % 5 is below
    CORRECT_OF[source][t], else label + 1; generate draws sample i's label as i % 10 in every modality except
    modality 2 for every 4th sample (i + 1). Records the own_w it was called with."""

    calls: list

    def generate_conditional(self, x, source, generator=None, own_w=False):
        self.calls.append(own_w)
        y, idx = read_labels(x), (x[:, 0, 0, 1] * 255.0 / STEP).round().long()
        out = []
        for t in range(self.config.n_modalities):
            shown = torch.where(idx < CORRECT_OF[source][t], y, (y + 1) % N_CLASSES)
            out.append((shown.float() * STEP / 255.0)[:, None, None, None].expand(-1, 1, 28, 28))
        return torch.stack(out)

    def generate(self, n, cluster=None, generator=None):
        labels = torch.arange(n) % N_CLASSES
        per_m = [labels.clone() for _ in range(self.config.n_modalities)]
        per_m[2][torch.arange(n) % 4 == 0] = (labels[torch.arange(n) % 4 == 0] + 1) % N_CLASSES
        return torch.stack([(y.float() * STEP / 255.0)[:, None, None, None].expand(-1, 1, 28, 28) for y in per_m])


def test_coherence_of_a_crafted_generator_with_classifiers_that_read_the_label():
    model = CraftedGenerator(ModelConfig(n_modalities=3, n_clusters=4, z_dim=4, w_dim=2, width=0.0625)).eval()
    model.calls = []
    clfs = ClassifierSet([PixelClassifier() for _ in range(3)], "trained", None)
    labels = balanced(50)
    cond = conditional_coherence(model, clfs, indexed_images(labels, 3), labels, batch_size=20)
    expected = np.array(CORRECT_OF) / 5.0
    assert np.allclose(cond["matrix"], expected)
    off = ~np.eye(3, dtype=bool)
    assert cond["per_target"] == pytest.approx([expected[:, t][off[:, t]].mean() for t in range(3)])
    assert cond["average"] == pytest.approx(expected[off].mean())  # (1 + 2 + 3 + 0 + 2 + 5) / 6 / 5
    assert cond["average"] == pytest.approx(13 / 30)
    assert cond["average_all"] == pytest.approx(expected.mean()) and cond["n"] == 50
    assert model.calls and all(model.calls)  # the diagonal is a self-reconstruction
    # unconditional: every 4th sample disagrees in modality 2
    unc = unconditional_coherence(model, clfs, 40, batch_size=40)  # one batch: sample i is i
    assert unc["coherence"] == pytest.approx(30 / 40)
    counts = [0] * N_CLASSES
    for i in range(40):
        if i % 4:
            counts[i % 10] += 1
    assert unc["agreed_label_counts"] == counts


# ----- conditional FID: the average over all pairs, of the same generation ----------------------------------
class TwoPixelFeatures(nn.Module):
    """A stand-in for the Inception network: the values of pixels (0, 0) and (0, 1) as 2 features."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, 0, 0, :2].float()


SHIFT_OF = [[0, 1, 2], [3, 0, 1], [2, 2, 0]]
"""Pixel values the pair source -> target adds: its FID against real images equal to the source's is 2 * shift^2
(two features, equal covariances)."""


class ShiftingGenerator(CMVAE):
    calls: list

    def generate_conditional(self, x, source, generator=None, own_w=False):
        self.calls.append(own_w)
        return torch.stack([x + SHIFT_OF[source][t] / 255.0 for t in range(self.config.n_modalities)])

    def generate(self, n, cluster=None, generator=None):  # the real images again, batch after batch
        start, self.drawn = self.drawn, self.drawn + n
        return self.real[:, start:start + n].float() / 255.0


def test_conditional_fid_averages_every_pair_and_mean_cross_the_cross_pairs():
    from cmvae_engine.cmvae.evaluation.fid import fid_scores

    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 200, (1, 64, 1, 28, 28), generator=g, dtype=torch.uint8)
    real = one.expand(3, -1, -1, -1, -1).contiguous()  # every modality holds the same images
    model = ShiftingGenerator(ModelConfig(n_modalities=3, n_clusters=4, z_dim=4, w_dim=2, width=0.0625)).eval()
    model.calls, model.real, model.drawn = [], real, 0
    out = fid_scores(model, TwoPixelFeatures(), real, n=64, batch_size=16, min_samples=3)
    expected = 2.0 * np.array(SHIFT_OF, dtype=float) ** 2
    assert np.allclose(out["conditional"]["matrix"], expected, atol=1e-6)
    off = ~np.eye(3, dtype=bool)
    assert out["conditional"]["mean"] == pytest.approx(expected.mean(), abs=1e-6)
    assert out["conditional"]["mean_cross"] == pytest.approx(expected[off].mean(), abs=1e-6)
    assert out["conditional"]["m1->m0"] == pytest.approx(18.0, abs=1e-6)
    assert all(model.calls)  # the same generation as coherence: the diagonal is a self-reconstruction
    assert out["unconditional"]["mean"] == pytest.approx(0.0, abs=1e-6)
