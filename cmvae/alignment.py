"""Cross-modal contrastive alignment of the shared latent's posterior means (used only as a warm start).

The modalities of one tuple share their content and nothing else, so an encoder pair that can tell which
of a batch's z means came from the same tuple has to encode that content. InfoNCE over the batch does this
far sooner than the reconstruction terms, which give the encoders a useful signal only once the decoders read
z. The `fast` recipe trains the z towers with it before the CMVAE objective starts and fades it out early in
training (engine/warm_start.py); the model and its objective are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_modal_infonce(z_loc: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean InfoNCE over ordered modality pairs (m, n), m != n, for posterior means z_loc [M, B, D].

    Each modality's means are centred over the batch before the cosine similarity: at initialisation every
    tower maps all inputs close to one direction, and without centring that common direction dominates the
    cosines and stalls learning for hundreds of steps. Positives: the same tuple in the other modality;
    negatives: the batch's other tuples. log(B) means no alignment at all.
    """
    m, b, _ = z_loc.shape
    if m < 2 or b < 2:
        raise ValueError(f"cross-modal InfoNCE needs at least 2 modalities and 2 tuples; got z_loc of shape "
                         f"{tuple(z_loc.shape)}")
    z = F.normalize(z_loc - z_loc.mean(1, keepdim=True), dim=-1)
    logits = torch.einsum("mbd,ncd->mnbc", z, z) / temperature  # [M, M, B, B]: <z_m,i, z_n,j> / T
    off_diag = ~torch.eye(m, dtype=torch.bool, device=z.device)
    pairs = logits[off_diag]  # [M(M-1), B, B]
    target = torch.arange(b, device=z.device).repeat(pairs.shape[0])
    return F.cross_entropy(pairs.reshape(-1, b), target)
