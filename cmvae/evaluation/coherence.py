"""Coherence (DESIGN section 4): do generated modalities show the digit they should?

Conditional: encode modality s of a test tuple, draw z ~ q_s(z|x_s) once, decode every modality t and count how
often classifier t returns the tuple's label. t != s (cross-modal) decodes with w_t ~ p(w_t); t == s decodes with
the source's own w_s ~ q_s(w|x_s), a self-reconstruction: exactly the reference's self- and cross-modal generation
(`self_and_cross_modal_generation_forward`), which FID's conditional matrix uses too
(cmvae/evaluation/fid.py). Unconditional: c ~ Cat(pi), z ~ p(z|c), w ~ p(w); a sample is coherent when all M
classifiers return the same label.
"""

from __future__ import annotations

import numpy as np
import torch

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.evaluation.classifier import ClassifierSet, predict
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.progress import ProgressFn, batches, report


@torch.no_grad()
def conditional_coherence(
    model: CMVAE, classifiers: ClassifierSet, images: torch.Tensor, labels: np.ndarray, *,
    batch_size: int = 1024, generator: torch.Generator | None = None, progress: ProgressFn | None = None,
) -> dict:
    """images uint8 [M, N, C, H, W], labels [N] -> {'matrix' [source][target], 'per_target', 'average',
    'average_all', 'n'}. `progress`: (batches x sources done, total).

    `average` is the reference's cross coherence: per target the mean over sources != target, then the mean
    over targets (every pair has the same count, so this is the mean of the off-diagonal entries); the
    diagonal (self-reconstructions) is in the matrix only. `average_all` is the mean of every entry, diagonal
    included: the average that the conditional FID's `mean` takes, for comparing the two.
    """
    device = next(model.parameters()).device
    m_count, n = images.shape[0], images.shape[1]
    y = torch.as_tensor(np.asarray(labels), device=device)
    hits = torch.zeros(m_count, m_count, dtype=torch.long, device=device)
    work, done = batches(n, batch_size) * m_count, 0
    for start in range(0, n, batch_size):
        x = to_float(images[:, start:start + batch_size].to(device))
        yb = y[start:start + batch_size]
        for s in range(m_count):
            gen = model.generate_conditional(x[s], s, generator=generator, own_w=True)  # [M, B, C, H, W]
            for t in range(m_count):
                hits[s, t] += (predict(classifiers.models[t], gen[t]) == yb).sum()
            done += 1
            report(progress, done, work)
    matrix = (hits.double() / n).cpu().numpy()  # sync point
    off = ~np.eye(m_count, dtype=bool)
    per_target = [float(matrix[:, t][off[:, t]].mean()) for t in range(m_count)]
    return {"matrix": matrix.tolist(), "per_target": per_target, "average": float(np.mean(per_target)),
            "average_all": float(matrix.mean()), "n": n}


@torch.no_grad()
def unconditional_coherence(
    model: CMVAE, classifiers: ClassifierSet, n: int, *, batch_size: int = 1024,
    generator: torch.Generator | None = None, progress: ProgressFn | None = None,
) -> dict:
    """Fraction of n prior samples whose M predicted labels all agree, plus how often each agreed label
    occurs (a model that draws one digit everywhere is coherent but useless: the counts show it).
    `progress`: (batches done, batches)."""
    device = next(model.parameters()).device
    coherent = torch.zeros((), dtype=torch.long, device=device)
    n_classes = classifiers.models[0].encoder[-1].out_features
    counts = torch.zeros(n_classes, dtype=torch.long, device=device)
    for start in range(0, n, batch_size):
        gen = model.generate(min(batch_size, n - start), generator=generator)  # [M, B, C, H, W]
        pred = torch.stack([predict(clf, gen[m]) for m, clf in enumerate(classifiers.models)])  # [M, B]
        agree = (pred == pred[:1]).all(dim=0)
        coherent += agree.sum()
        counts += torch.bincount(pred[0][agree], minlength=n_classes)
        report(progress, start // batch_size + 1, batches(n, batch_size))
    return {"coherence": int(coherent) / n, "n": n, "agreed_label_counts": counts.cpu().tolist()}
