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


def save_grid(path: str | Path, images: torch.Tensor, scale: int = 2) -> Path:
    """Save images [rows, cols, C, H, W] as one PNG, each pixel enlarged `scale` times for viewing."""
    arr = grid_array(images)
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
