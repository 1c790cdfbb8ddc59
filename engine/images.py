"""PNG grids of images, written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmvae_engine.engine.checkpoint import atomic_write_bytes


def grid_array(images: torch.Tensor, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """images [rows, cols, C, H, W] in [0, 1] -> uint8 [H', W', 3] with `pad` pixels between tiles."""
    rows, cols, c, h, w = images.shape
    imgs = images.detach().float().clamp(0, 1).cpu()
    if c == 1:
        imgs = imgs.expand(-1, -1, 3, -1, -1)
    canvas = torch.full((3, rows * (h + pad) + pad, cols * (w + pad) + pad), pad_value)
    for r in range(rows):
        for col in range(cols):
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            canvas[:, y:y + h, x:x + w] = imgs[r, col, :3]
    return (canvas.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


TITLE_HEIGHT = 24
"""Pixels above a grid that has a title."""
FONT_SIZE = 15


def cluster_labels(order: list[int], mass: list[float]) -> list[str]:
    """Row labels of a per-cluster grid: the cluster id and its prior mass."""
    return [f"c{c}  pi {mass[c]:.3f}" for c in order]


def labelled(img: Image.Image, row_labels: list[str] | None, title: str | None, pad: int) -> Image.Image:
    """The grid with a label left of each row and a title line above (white margins, black text)."""
    if not row_labels and not title:
        return img
    from PIL import ImageDraw, ImageFont

    try:  # a scalable font where Pillow has FreeType (>= 10.1), so labels stay legible on scaled pages
        font = ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, OSError, ImportError):
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)

    def width(text: str) -> int:
        box = draw.textbbox((0, 0), text, font=font)
        return box[2] - box[0]

    rows = len(row_labels or [])
    left = (max(width(t) for t in row_labels) + 10) if rows else 0
    top = TITLE_HEIGHT if title else 0
    line = draw.textbbox((0, 0), "Ag", font=font)[3]
    canvas = Image.new("RGB", (img.width + left, img.height + top), "white")
    canvas.paste(img, (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, (TITLE_HEIGHT - line) / 2), title, fill="black", font=font)
    if rows:
        row_h = (img.height - pad) / rows
        for r, text in enumerate(row_labels):
            draw.text((4, top + pad + r * row_h + (row_h - line) / 2), text, fill="black", font=font)
    return canvas


def save_grid(path: str | Path, images: torch.Tensor, scale: int = 2, row_labels: list[str] | None = None,
              title: str | None = None) -> Path:
    """Save images [rows, cols, C, H, W] as one PNG, each pixel enlarged `scale` times for viewing; optionally
    with a label left of each row and a title above."""
    if row_labels is not None and len(row_labels) != images.shape[0]:
        raise ValueError(f"{len(row_labels)} row labels for {images.shape[0]} rows")
    arr = grid_array(images)
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img = labelled(img, row_labels, title, pad=2 * scale)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


TEXT_COLUMN = 520
"""Pixels of the caption column right of a grid with texts."""


def save_grid_with_text(path: str | Path, images: torch.Tensor, texts: list[str], scale: int = 2,
                        row_labels: list[str] | None = None, title: str | None = None) -> Path:
    """save_grid, plus one line of text (e.g. the row's captions) right of each row: captions shown as text next
    to the images they belong to."""
    if len(texts) != images.shape[0]:
        raise ValueError(f"{len(texts)} texts for {images.shape[0]} rows")
    from PIL import ImageDraw, ImageFont

    img = Image.fromarray(grid_array(images))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    try:
        font = ImageFont.load_default(size=FONT_SIZE - 2)
    except (TypeError, OSError, ImportError):
        font = ImageFont.load_default()
    canvas = Image.new("RGB", (img.width + TEXT_COLUMN, img.height), "white")
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = (img.height - 2 * scale) / max(1, len(texts))
    line = draw.textbbox((0, 0), "Ag", font=font)[3]
    for r, text in enumerate(texts):
        draw.text((img.width + 6, 2 * scale + r * row_h + (row_h - line) / 2), _fit(draw, text, font), fill="black",
                  font=font)
    canvas = labelled(canvas, row_labels, title, pad=2 * scale)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _fit(draw, text: str, font) -> str:
    """The text, cut with an ellipsis to the caption column's width (bisection: a few text measurements)."""
    def fits(t: str) -> bool:
        return draw.textbbox((0, 0), t, font=font)[2] <= TEXT_COLUMN - 12

    if fits(text):
        return text
    lo, hi = 0, len(text)  # text[:lo] + "..." fits, text[:hi] + "..." does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(text[:mid] + "...") else (lo, mid)
    return text[:lo] + "..."
