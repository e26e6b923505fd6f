"""Data sets the evaluators measure on, all available offline.

* Text: Python's own ``pydoc_data.topics`` (English prose about Python), split by topic
  into a training part and a held-out part (every 10th topic in sorted key order); the
  calibration text is the training part without any topic whose text is also a held-out
  topic (``else`` and ``if`` share one text).
* Glyphs: the 36 characters ``0-9A-Z`` rendered at 16x16 from the TrueType fonts that
  matplotlib ships; a fixed set of fonts is held out for testing. The committed test set
  (``weights/glyph_test.npz``) makes evaluation independent of font versions.
* Digits: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn), split 70/30
  with a fixed seed.

Pixel values are floats in [0, 1]; labels are int64 class indices.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

GLYPH_CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
GLYPH_SIZE_PX = 16
#: Fonts (file names in matplotlib's ``fonts/ttf``) with all 36 glyphs in a usable encoding.
GLYPH_TRAIN_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
    "cmmi10.ttf",
)
#: Fonts the glyph models never see in training.
GLYPH_TEST_FONTS: tuple[str, ...] = (
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSerif-Italic.ttf",
    "STIXGeneralBol.ttf",
    "cmss10.ttf",
)


# --------------------------------------------------------------------------- text
def text_splits() -> tuple[str, str]:
    """Return ``(train_text, heldout_text)`` from ``pydoc_data.topics``.

    Topics are sorted by key; every 10th topic (index 0, 10, 20, ...) is held out.
    """
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    train = [topics.topics[k] for i, k in enumerate(keys) if i % 10 != 0]
    held = [topics.topics[k] for i, k in enumerate(keys) if i % 10 == 0]
    return "\n".join(train), "\n".join(held)


def calibration_text() -> str:
    """Training topics (as in :func:`text_splits`) minus every topic whose text equals a
    held-out topic's text: calibration data that shares no topic with the evaluation text.
    """
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    held = {topics.topics[k] for i, k in enumerate(keys) if i % 10 == 0}
    return "\n".join(topics.topics[k] for i, k in enumerate(keys)
                     if i % 10 != 0 and topics.topics[k] not in held)


def text_digest(text: str) -> str:
    """Short sha256 of a text (identifies the evaluation data in cache keys)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- glyphs
def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=64)
def _render_master(font_file: str, char: str, canvas_px: int = 64) -> np.ndarray:
    """Render ``char`` with ``font_file`` centred on a square canvas, glyph height ~60%.

    Returns a float32 array (canvas_px, canvas_px) in [0, 1].
    """
    from matplotlib.ft2font import FT2Font

    font = FT2Font(os.fspath(_font_dir() / font_file))
    font.set_size(48, 72)
    font.set_text(char, 0.0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    img = np.asarray(font.get_image(), dtype=np.float32) / 255.0
    ys, xs = np.nonzero(img > 0.05)
    if ys.size == 0:
        raise ValueError(f"font {font_file!r} renders no pixels for {char!r}")
    img = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = img.shape
    scale = (0.6 * canvas_px) / max(h, w)
    # Nearest-area resize with numpy (exact, no extra dependency): bilinear via torch.
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = F.interpolate(t, size=(nh, nw), mode="area")[0, 0].numpy()
    out = np.zeros((canvas_px, canvas_px), dtype=np.float32)
    y0, x0 = (canvas_px - nh) // 2, (canvas_px - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = t
    return out


def render_glyphs(
    fonts: tuple[str, ...], n_per_glyph: int, seed: int, augment: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Render every class of every font ``n_per_glyph`` times with random affine jitter.

    Jitter (when ``augment``): scale 0.85-1.25, rotation +-10 deg, shear +-0.15,
    translation +-1.5 output pixels. Deterministic for a given seed.

    Returns:
        images: float32 (N, 1, 16, 16) in [0, 1]; labels: int64 (N,).
    """
    import torch
    import torch.nn.functional as F

    masters = []
    labels = []
    for font in fonts:
        for ci, ch in enumerate(GLYPH_CLASSES):
            masters.append(_render_master(font, ch))
            labels.append(ci)
    base = torch.from_numpy(np.stack(masters))[:, None]  # (M,1,64,64)
    base = base.repeat_interleave(n_per_glyph, dim=0)
    lab = np.repeat(np.asarray(labels, dtype=np.int64), n_per_glyph)
    n = base.shape[0]
    g = torch.Generator().manual_seed(seed)
    if augment:
        scale = 0.85 + 0.4 * torch.rand(n, generator=g)
        rot = (torch.rand(n, generator=g) - 0.5) * 2 * np.deg2rad(10.0)
        shear = (torch.rand(n, generator=g) - 0.5) * 0.3
        shift = (torch.rand(n, 2, generator=g) - 0.5) * 2 * (1.5 / 8.0)
    else:
        scale = torch.ones(n)
        rot = torch.zeros(n)
        shear = torch.zeros(n)
        shift = torch.zeros(n, 2)
    cos, sin = torch.cos(rot), torch.sin(rot)
    # Output->input sampling matrix: inverse of (scale * rotation * shear).
    a = torch.stack([torch.stack([cos, -sin + shear], -1), torch.stack([sin, cos], -1)], -2)
    a = a / scale[:, None, None]
    theta = torch.cat([a, shift[:, :, None]], dim=2)
    grid = F.affine_grid(theta, [n, 1, 32, 32], align_corners=False)
    out = F.grid_sample(base, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = F.avg_pool2d(out, 2).clamp_(0.0, 1.0)
    return out.numpy().astype(np.float32), lab


def glyph_test_set(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """A committed glyph set: float32 images (N,1,16,16) in [0,1], int64 labels.

    ``split``: ``test`` (fonts never seen in training, 1152 images) or ``calib`` (training
    fonts, a rendering seed unused in training, 648 images; for calibration/statistics).
    """
    if split not in ("test", "calib"):
        raise ValueError(f"split: expected 'test' or 'calib', got {split!r}")
    with np.load(WEIGHTS_DIR / f"glyph_{split}.npz") as z:
        return z["images"].astype(np.float32) / 255.0, z["labels"].astype(np.int64)


# --------------------------------------------------------------------------- digits
def digits_splits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits as ``(x_train, y_train, x_test, y_test)``.

    Images are float32 (N, 1, 8, 8) scaled to [0, 1]; 30% test, stratified, fixed seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte
