"""Do captions generated from images name the right class? For data whose class names are words of the caption
vocabulary (polydigits-captions: "zero" .. "nine"), a caption generated from modality s (z ~ q_s(z | x_s), w from the
prior, the most likely word per position) names the class when it holds the true class's word and no other class's
word. A direct check of the words, needing no caption classifier."""

from __future__ import annotations

import numpy as np
import torch

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.progress import ProgressFn, batches, report


def caption_words(tokens: torch.Tensor, words: list[str], pad_id: int, end_id: int) -> list[str]:
    """Token ids [N, L] -> N strings: the words up to (not including) the first end token, padding dropped."""
    out = []
    for row in tokens.tolist():
        kept = []
        for t in row:
            if t == end_id:
                break
            if t != pad_id:
                kept.append(words[t] if 0 <= t < len(words) else f"<{t}?>")
        out.append(" ".join(kept))
    return out


def names_class(caption: str, label: int, label_names: list[str]) -> bool:
    said = set(caption.split())
    return label_names[label] in said and not any(n in said for i, n in enumerate(label_names) if i != label)


def applicable(label_names: list[str] | None, words: list[str]) -> bool:
    """The check needs one-word class names that are all in the vocabulary."""
    return bool(label_names) and all(" " not in n and n in words for n in label_names)


@torch.no_grad()
def caption_naming(model, images, labels: np.ndarray, label_names: list[str], vocabs: dict[int, list[str]], *,
                   batch_size: int = 512, generator: torch.Generator | None = None,
                   progress: ProgressFn | None = None, examples: int = 8) -> dict:
    """Rate per (image source, caption target) pair of generated captions naming the true class, over the split
    (images: Modalities [M, N, ...]); plus a few examples."""
    specs = model.specs
    sources = [m for m, s in enumerate(specs) if s["kind"] == "image"]
    targets = [m for m, s in enumerate(specs) if s["kind"] == "text"]
    n = images.shape[1]
    hits = {(s, t): 0 for s in sources for t in targets}
    shown: list[dict] = []
    work, done = batches(n, batch_size) * len(sources), 0
    for start in range(0, n, batch_size):
        x = to_float(images[:, start:start + batch_size].to(model.prior_logits.device))
        yb = labels[start:start + batch_size]
        for s in sources:
            gen = model.generate_conditional(x[s], s, generator=generator)
            for t in targets:
                spec = specs[t]
                caps = caption_words(gen[t].cpu(), vocabs[t], spec["pad_id"], spec["end_id"])
                ok = [names_class(c, int(y), label_names) for c, y in zip(caps, yb, strict=True)]
                hits[(s, t)] += sum(ok)
                for c, y, good in zip(caps, yb, ok, strict=True):
                    if len(shown) < examples:
                        shown.append({"source": s, "target": t, "label": label_names[int(y)], "caption": c,
                                      "names_class": good})
            done += 1
            report(progress, done, work)
    pairs = {f"m{s}->m{t}": hits[(s, t)] / n for s, t in hits}
    return {"rate": float(np.mean(list(pairs.values()))) if pairs else None, "pairs": pairs, "n": n,
            "rule": "the caption holds the true class's word and no other class's word", "examples": shown}
