"""`--save-attention WORD`: the cross-attention map of a word, per frame, as an image grid.

One row per prompt that contains the word (source first), one column per frame; each cell is the
word's map averaged over steps and cross-attention layers, on the latent grid, normalised to [0, 255]
and upscaled (nearest) to `cell` pixels. Users read it to choose blend words and thresholds.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..files import atomic_path
from .controllers import AttentionStore
from .words import P2PError, word_token_indices


def attention_grid(store: AttentionStore, tokenizer, prompts: Sequence[str], word: str, cell: int = 64) -> np.ndarray:
    """(rows * cell, frames * cell) uint8 grid of `word`'s averaged cross-attention maps."""
    weights = torch.zeros(len(prompts), tokenizer.model_max_length)
    rows = []
    for k, prompt in enumerate(prompts):
        idx = word_token_indices(tokenizer, prompt, word)
        if idx:
            weights[k, idx] = 1.0
            rows.append(k)
    if not rows:
        raise P2PError(f"--save-attention word {word!r} is in neither prompt ({' / '.join(map(repr, prompts))}); "
                       "use a word of the source or the target prompt")
    maps = store.word_maps(weights)[rows]  # r f h w
    maps = maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    r, f, h, w = maps.shape
    scale = max(1, round(cell / max(h, w)))
    maps = F.interpolate(maps.reshape(r * f, 1, h, w), scale_factor=scale, mode="nearest").reshape(r, f, h * scale, w * scale)
    grid = maps.permute(0, 2, 1, 3).reshape(r * h * scale, f * w * scale)  # (r h) (f w)
    return (grid * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def save_attention_grid(store: AttentionStore, tokenizer, prompts: Sequence[str], word: str,
                        path: str | os.PathLike, cell: int = 64) -> Path:
    """Write `attention_grid` as a PNG (atomically); returns the path."""
    grid = attention_grid(store, tokenizer, prompts, word, cell)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid, mode="L").save(tmp, format="PNG")
    return path
