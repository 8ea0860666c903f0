"""Catalog rows + imaging -> model-ready stamps (uint8 RGB arrays, optionally PNG)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Stamp:
    """One prepared cutout. ``index`` is the position in the run, ``row`` the catalog
    row. ``pixels`` is uint8 of shape (H, W, 3); ``png`` holds the same pixels encoded
    when the engine wants bytes. ``flags`` note what preparation had to do
    (``edge-padded``, ``nan-filled``, ``constant``, ``shrunk``); ``error`` is set (and
    ``pixels`` None) when no stamp could be made for the row."""

    index: int
    row: int
    pixels: np.ndarray | None
    png: bytes | None = None
    flags: tuple[str, ...] = ()
    error: str | None = None
