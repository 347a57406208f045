"""Figures of an attack: a grid of originals over reconstructions, and an animation.

Images are float tensors in [0, 1] shaped (N, C, H, W) with C = 1 (grey) or 3. Files are
written to a temporary name and renamed into place, so a crash never leaves half a PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["save_animation", "save_grid", "tile"]


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (N, H, W, C) uint8, clipping what the attack left outside."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (N, 1|3, H, W), got {tuple(images.shape)}")
    arr = images.detach().to(torch.float32).clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def tile(rows: Sequence[torch.Tensor], *, scale: int = 4, gap: int = 2) -> Image.Image:
    """Rows of equally shaped images into one picture (rows top to bottom), upscaled by
    ``scale`` with nearest neighbour so single pixels stay visible."""
    if not rows:
        raise ValueError("tile: no rows")
    arrays = [_to_uint8(r) for r in rows]
    _, h, w, c = arrays[0].shape
    if any(a.shape[1:] != (h, w, c) for a in arrays):
        raise ValueError("tile: rows differ in image shape")
    cols = max(a.shape[0] for a in arrays)
    canvas = np.full((len(arrays) * (h + gap) - gap, cols * (w + gap) - gap, c), 255, np.uint8)
    for r, arr in enumerate(arrays):
        for i in range(arr.shape[0]):
            y, x = r * (h + gap), i * (w + gap)
            canvas[y : y + h, x : x + w] = arr[i]
    mode = "L" if c == 1 else "RGB"
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode=mode)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def save_grid(
    path: str | os.PathLike[str],
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    *,
    psnr: Sequence[float],
    ssim: Sequence[float],
    title: str | None = None,
    per_row: int = 8,
) -> Path:
    """PNG: blocks of ``per_row`` originals above their reconstructions, PSNR/SSIM under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = originals.shape[0]
    if reconstructions.shape != originals.shape or len(psnr) != n or len(ssim) != n:
        raise ValueError(
            "save_grid: originals, reconstructions, psnr and ssim must match in length"
        )
    orig, rec = _to_uint8(originals), _to_uint8(reconstructions)
    cols = min(per_row, n)
    blocks = math.ceil(n / cols)
    fig, axes = plt.subplots(2 * blocks, cols, figsize=(1.3 * cols, 2.9 * blocks), squeeze=False)
    cmap = "gray" if orig.shape[-1] == 1 else None
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        b, col = divmod(i, cols)
        top, bottom = axes[2 * b, col], axes[2 * b + 1, col]
        top.imshow(orig[i].squeeze(-1) if cmap else orig[i], cmap=cmap, vmin=0, vmax=255)
        top.set_title("original" if col == 0 else "", fontsize=7)
        bottom.imshow(rec[i].squeeze(-1) if cmap else rec[i], cmap=cmap, vmin=0, vmax=255)
        bottom.set_title(f"{psnr[i]:.1f} dB\nSSIM {ssim[i]:.2f}", fontsize=7, y=-0.42)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    target = Path(path)
    tmp = _atomic_target(target)
    try:
        fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    os.replace(tmp, target)
    return target


def save_animation(
    path: str | os.PathLike[str],
    frames: Sequence[torch.Tensor],
    originals: torch.Tensor | None = None,
    *,
    duration_ms: int = 120,
    scale: int = 4,
) -> Path:
    """Animated GIF of reconstructions over iterations; each frame shows the originals (if
    given) above the reconstructions at that point. The last frame is held longer."""
    if not frames:
        raise ValueError("save_animation: no frames")
    pictures = []
    for frame in frames:
        rows = [originals, frame] if originals is not None else [frame]
        pictures.append(tile(rows, scale=scale).convert("P"))
    durations = [duration_ms] * (len(pictures) - 1) + [duration_ms * 10]
    target = Path(path)
    tmp = _atomic_target(target)
    pictures[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=pictures[1:],
        duration=durations,
        loop=0,
    )
    os.replace(tmp, target)
    return target
