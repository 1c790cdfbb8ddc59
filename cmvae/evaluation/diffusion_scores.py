"""CMVAE and D-CMVAE samples scored side by side, on the same draws (D-CMVAE denoises the CMVAE's own samples).

- classifier_fd: a Frechet distance between Gaussians fitted to the penultimate-layer features (128-d, after the
  ReLU) of our digit classifiers, generated images of modality m against real images of modality m. It is NOT
  FID (no Inception network): it measures quality where Inception weights cannot be had, on the features that
  tell digits apart. Lower is better.
- coherence: unconditional (all M classifiers agree) and conditional (the classifier of target t returns the
  source tuple's label), as cmvae/evaluation/coherence.py, on the same samples.
- FID (Inception features) when the caller passes an Inception network.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from cmvae_engine.cmvae.diffusion.generation import generate, generate_conditional
from cmvae_engine.cmvae.diffusion.model import DCMVAE
from cmvae_engine.cmvae.evaluation.classifier import ClassifierSet, DigitClassifier, predict
from cmvae_engine.cmvae.evaluation.fid import GaussianStats, fid_from_features, inception_features, quantize
from cmvae_engine.cmvae.progress import ProgressFn, report

PENULTIMATE = 10
"""encoder[:10] of DigitClassifier ends with the ReLU after Linear(980, 128)."""
MODELS = ("cmvae", "dcmvae")


@torch.no_grad()
def classifier_features(clf: DigitClassifier, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """images [N, C, H, W] in [0, 1] -> [N, 128] penultimate-layer features (eval mode: no dropout)."""
    body = clf.encoder[:PENULTIMATE]
    dev = next(clf.parameters()).device
    parts = [body(images[i:i + batch_size].to(dev)) for i in range(0, len(images), batch_size)]
    return torch.cat(parts)


def _score_set(images: torch.Tensor, m: int, classifiers: ClassifierSet, ref: list[GaussianStats],
               inception: Callable | None, ref_inc: list[GaussianStats] | None) -> dict:
    out = {"classifier_fd": fid_from_features(ref[m], classifier_features(classifiers.models[m], images))}
    if inception is not None:
        out["fid"] = fid_from_features(ref_inc[m], inception_features(inception, quantize(images)))
    return out


@torch.no_grad()
def compare_samples(model: DCMVAE, classifiers: ClassifierSet, real: torch.Tensor, labels: np.ndarray, *,
                    n_unconditional: int, n_conditional: int, batch_size: int = 250,
                    generator: torch.Generator | None = None, inception: Callable | None = None,
                    progress: ProgressFn | None = None, **sample_kw) -> dict:
    """real: float images [M, N, C, H, W] in [0, 1] of the reference split (every tuple is the FD reference; the
    first n_conditional ones condition). Returns {'unconditional': {model: {...}}, 'conditional': {model: {...}}}
    for model in ('cmvae', 'dcmvae'). `sample_kw` goes to the sampler (sampler, steps, eta, eps_fns)."""
    m_count = real.shape[0]
    dev = real.device
    y = torch.as_tensor(np.asarray(labels), device=dev)
    ref = [GaussianStats.of(classifier_features(classifiers.models[m], real[m]).to(dev)) for m in range(m_count)]
    ref_inc = ([GaussianStats.of(inception_features(inception, quantize(real[m])).to(dev)) for m in range(m_count)]
               if inception is not None else None)
    n_cond = min(n_conditional, real.shape[1])
    work = -(-n_unconditional // batch_size) + m_count * -(-n_cond // batch_size)
    done = 0

    # unconditional: the same prior draws, as the CMVAE decodes them and as D-CMVAE denoises them
    gens = {k: [[] for _ in range(m_count)] for k in MODELS}
    for start in range(0, n_unconditional, batch_size):
        x_hat, refined = generate(model, min(batch_size, n_unconditional - start), generator=generator, **sample_kw)
        for m in range(m_count):
            gens["cmvae"][m].append(x_hat[m])
            gens["dcmvae"][m].append(refined[m])
        done += 1
        report(progress, done, work)
    uncond = {}
    for k in MODELS:
        imgs = [torch.cat(g) for g in gens[k]]
        per = [_score_set(imgs[m], m, classifiers, ref, inception, ref_inc) for m in range(m_count)]
        pred = torch.stack([predict(classifiers.models[m], imgs[m]) for m in range(m_count)])
        row = {"coherence": float((pred == pred[:1]).all(0).double().mean()),
               "classifier_fd": float(np.mean([p["classifier_fd"] for p in per])),
               "classifier_fd_per_modality": [p["classifier_fd"] for p in per]}
        if inception is not None:
            row["fid"] = float(np.mean([p["fid"] for p in per]))
        uncond[k] = row

    # conditional: z from a source modality's posterior (w from the prior), every target modality
    cond = {k: {"fd": np.zeros((m_count, m_count)), "coh": np.zeros((m_count, m_count)),
                "fid": np.zeros((m_count, m_count))} for k in MODELS}
    for s in range(m_count):
        parts = {k: [[] for _ in range(m_count)] for k in MODELS}
        for start in range(0, n_cond, batch_size):
            x = real[s, start:min(start + batch_size, n_cond)]
            x_hat, refined = generate_conditional(model, x, s, generator=generator, **sample_kw)
            for t in range(m_count):
                parts["cmvae"][t].append(x_hat[t])
                parts["dcmvae"][t].append(refined[t])
            done += 1
            report(progress, done, work)
        for k in MODELS:
            for t in range(m_count):
                imgs = torch.cat(parts[k][t])
                sc = _score_set(imgs, t, classifiers, ref, inception, ref_inc)
                cond[k]["fd"][s, t] = sc["classifier_fd"]
                cond[k]["fid"][s, t] = sc.get("fid", np.nan)
                cond[k]["coh"][s, t] = float((predict(classifiers.models[t], imgs) == y[:n_cond]).double().mean())
    off = ~np.eye(m_count, dtype=bool)
    conditional = {}
    for k in MODELS:
        row = {"coherence": float(cond[k]["coh"][off].mean()), "classifier_fd": float(cond[k]["fd"][off].mean()),
               "coherence_matrix": cond[k]["coh"].tolist(), "classifier_fd_matrix": cond[k]["fd"].tolist()}
        if inception is not None:
            row["fid"] = float(cond[k]["fid"][off].mean())
        conditional[k] = row
    return {"unconditional": uncond, "conditional": conditional, "n_unconditional": n_unconditional,
            "n_conditional": n_cond, "n_reference": int(real.shape[1]),
            "note": "conditional scores average the source != target pairs; classifier_fd is a Frechet distance "
                    "in the digit classifiers' penultimate-layer feature space (not FID)"}
