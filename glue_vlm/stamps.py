"""Catalog rows + imaging -> model-ready stamps (uint8 RGB arrays, optionally PNG).

Three sources of raw cutouts, each aligned with the catalog's rows:

- ``CubeSource``: a stamp cube (N x H x W, N x H x W x 3 or N x 3 x H x W), e.g. a
  numpy or FITS memmap; only the rows asked for are read.
- ``ImageSource``: one big image (or three bands of it) plus positions in pixels or in
  sky coordinates through its WCS; cut like ``astropy.nddata.Cutout2D`` in ``partial``
  mode (same ``overlap_slices`` geometry).
- ``PathSource``: a column of file paths (FITS, PNG, JPEG).

Stamps come out top row first, the way an image viewer shows them: image arrays in
FITS and Glue have row 0 at the bottom (y grows upwards), so cutouts of an
``ImageSource``, FITS files and FITS cubes are flipped; ``.npy`` cubes and PNG/JPEG files
are taken as stored (row 0 at the top).

``prepare_stamp`` turns one raw cutout into display-ready pixels with
``astropy.visualization`` (uint8 input is already display-ready and passes through);
``iter_stamps`` streams ``Stamp`` objects in row order, preparing chunks ahead in
background threads so that a run never waits for its stamps.
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["Stamp", "StampError", "StampSettings", "StampSource", "CubeSource",
           "ImageSource", "PathSource", "prepare_stamp", "encode_png", "iter_stamps",
           "read_image_file", "STRETCHES", "INTERVALS", "RGB_MODES"]

STRETCHES = ("asinh", "log", "sqrt", "linear")
INTERVALS = ("percentile", "zscale")
RGB_MODES = ("lupton", "per-band")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz")


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


class StampError(ValueError):
    """Bad stamp input. Raised by a source's constructor for input that cannot work at
    all, and by ``StampSource.raw`` for one row (that row gets ``Stamp.error``)."""


@dataclass
class StampSettings:
    """How raw cutouts become pixels. ``stretch`` and ``interval`` are the
    ``astropy.visualization`` ones; ``percentile`` is the interval's central percentage.
    ``rgb`` says how three float bands combine: ``lupton`` (colour-preserving,
    ``make_lupton_rgb`` on the joint intensity) or ``per-band``. ``max_size`` shrinks
    larger stamps (never enlarges); ``encode_png`` also fills ``Stamp.png``."""

    stretch: str = "asinh"
    interval: str = "percentile"
    percentile: float = 99.5
    max_size: int | None = None
    encode_png: bool = False
    rgb: str = "lupton"

    def __post_init__(self):
        _check_choice("stretch", self.stretch, STRETCHES)
        _check_choice("interval", self.interval, INTERVALS)
        _check_choice("rgb", self.rgb, RGB_MODES)
        if not 0 < self.percentile <= 100:
            raise StampError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.max_size is not None and int(self.max_size) < 1:
            raise StampError(f"max_size must be a positive number of pixels, got {self.max_size}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise StampError(f"unknown {name} {value!r}: use one of {', '.join(choices)}")


# --------------------------------------------------------------------------- sources

class StampSource(ABC):
    """A row-aligned source of raw cutouts: ``raw(row)`` gives the cutout for catalog
    row ``row`` (2-D, or H x W x 3) and flags, or raises ``StampError`` for that row.
    ``raw`` may be called from several threads at once."""

    n_rows: int

    @abstractmethod
    def raw(self, row: int) -> tuple[np.ndarray, tuple[str, ...]]:
        """The raw cutout of catalog row ``row`` and the flags it earned."""


class CubeSource(StampSource):
    """Stamps stacked on a first axis that is the catalog row: N x H x W (one band),
    N x H x W x 3 or N x 3 x H x W (three bands, red first). Any array-like with
    ``shape`` and row indexing works (numpy memmap, FITS memmap, h5py); only the rows
    asked for are read."""

    def __init__(self, cube, n_rows: int | None = None, bottom_up: bool = False):
        self.bottom_up = bottom_up
        if not hasattr(cube, "shape"):
            cube = np.asarray(cube)
        shape = tuple(cube.shape)
        if len(shape) not in (3, 4):
            raise StampError(f"a stamp cube must be N x H x W or N x H x W x 3 "
                             f"(or N x 3 x H x W); got shape {shape}")
        self._channels_first = False
        if len(shape) == 4:
            if shape[-1] in (3, 4):
                pass
            elif shape[1] == 3:
                self._channels_first = True
            else:
                raise StampError(f"a 4-D stamp cube needs 3 bands on its last or second "
                                 f"axis (N x H x W x 3 or N x 3 x H x W); got shape {shape}")
        if n_rows is not None and shape[0] != n_rows:
            raise StampError(f"the stamp cube has {shape[0]} stamps but the catalog has "
                             f"{n_rows} rows: the cube's first axis must be the catalog row")
        self._cube = cube
        self.n_rows = shape[0]
        self.stamp_shape = shape[1:]

    @classmethod
    def from_file(cls, path, ext=None, n_rows: int | None = None) -> "CubeSource":
        """A cube from a FITS file (memory-mapped; ``ext`` = HDU, default the first
        with data; its stamps are bottom-up, as FITS images are) or a ``.npy`` file
        (memory-mapped; stamps top-down, as image files are)."""
        path = Path(path)
        if path.suffix == ".npy":
            try:
                cube = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise StampError(f"cannot read stamp cube {path}: {exc}") from None
            return cls(cube, n_rows)
        return cls(_fits_data(path, ext, memmap=True), n_rows, bottom_up=True)

    def raw(self, row):
        stamp = np.asarray(self._cube[row])
        if self._channels_first:
            stamp = np.moveaxis(stamp, 0, -1)
        return (stamp[::-1] if self.bottom_up else stamp), ()


class ImageSource(StampSource):
    """Cutouts of ``size`` centred on positions in one image.

    ``image``: a 2-D array, three bands (3 x H x W, H x W x 3 or a sequence of three
    2-D arrays, red first), or anything with ``.data`` and ``.wcs``/``.header``
    (NDData, CCDData, a FITS HDU). ``size``: pixels (int, or (ny, nx)), or an angle
    (astropy Quantity; needs a WCS). Positions: ``x``/``y`` pixel arrays (0-based) or
    ``ra``/``dec`` (degrees or Quantity; need a WCS), one per catalog row; a missing
    (masked or NaN) position is an error for its row. A cutout
    running off the edge is padded with the median of its on-image pixels and flagged
    ``edge-padded``; one with no overlap is an error for its row.
    """

    def __init__(self, image, *, size, x=None, y=None, ra=None, dec=None, wcs=None):
        if not isinstance(image, np.ndarray) and hasattr(image, "data"):
            if wcs is None:
                wcs = getattr(image, "wcs", None)
            if wcs is None:
                wcs = getattr(image, "header", None)
            image = image.data
        self._planes = _image_planes(image)
        self.image_shape = self._planes[0].shape
        wcs = _as_wcs(wcs)
        self.size = _size_in_pixels(size, wcs)
        self._sky = None
        if (x is None) != (y is None):
            raise StampError("give both x and y pixel positions (or ra and dec)")
        if (ra is None) != (dec is None):
            raise StampError("give both ra and dec (or x and y pixel positions)")
        if x is not None and ra is not None:
            raise StampError("give pixel positions (x, y) or sky positions (ra, dec), not both")
        if x is not None:
            self._x, self._y = _paired_arrays("x", x, "y", y)
        elif ra is not None:
            if wcs is None:
                raise StampError("sky positions (ra/dec) need the image's WCS: pass "
                                 "wcs=WCS(header), or give x/y pixel positions")
            ra_deg, dec_deg = _paired_arrays("ra", _degrees(ra), "dec", _degrees(dec))
            self._x, self._y = _sky_to_pixel(wcs, ra_deg, dec_deg)
            self._sky = (ra_deg, dec_deg)
        else:
            raise StampError("give the stamp centres: x/y in pixels, or ra/dec with a WCS")
        self.n_rows = len(self._x)

    @classmethod
    def from_fits(cls, path, *, ext=None, **kwargs) -> "ImageSource":
        """An image and its WCS from a FITS file (memory-mapped)."""
        data, header = _fits_data(path, ext, memmap=True, with_header=True)
        wcs = kwargs.pop("wcs", None)
        if wcs is None and ("CTYPE1" in header or "CTYPE2" in header):
            wcs = header
        return cls(data, wcs=wcs, **kwargs)

    def _where(self, row: int) -> str:
        if self._sky is not None:
            return f"RA {self._sky[0][row]:.6f}, Dec {self._sky[1][row]:.6f}"
        return f"x {self._x[row]:.1f}, y {self._y[row]:.1f}"

    def raw(self, row):
        from astropy.nddata.utils import NoOverlapError, overlap_slices

        cx, cy = float(self._x[row]), float(self._y[row])
        if not (np.isfinite(cx) and np.isfinite(cy)):
            raise StampError(f"no usable position for this row ({self._where(row)})")
        try:
            big, small = overlap_slices(self.image_shape, self.size, (cy, cx), mode="partial")
        except NoOverlapError:
            height, width = self.image_shape
            raise StampError(f"the cutout at {self._where(row)} lies outside the image "
                             f"({width} x {height} pixels)") from None
        padded = any(s.start != 0 or s.stop != n for s, n in zip(small, self.size))
        cut = []
        for plane in self._planes:
            inside = np.asarray(plane[big])
            if not padded:
                cut.append(inside.copy())
                continue
            out = np.empty(self.size, dtype=inside.dtype)
            finite = inside[np.isfinite(inside)] if inside.dtype.kind == "f" else inside
            out[...] = np.median(finite) if finite.size else 0
            out[small] = inside
            cut.append(out)
        stamp = cut[0] if len(cut) == 1 else np.stack(cut, axis=-1)
        return stamp[::-1], ("edge-padded",) if padded else ()


class PathSource(StampSource):
    """One image file per catalog row (FITS, PNG, JPEG or anything Pillow reads).
    Relative paths are taken from ``base_dir`` (default: the working directory). A
    missing or unreadable file is an error for its row only."""

    def __init__(self, paths, base_dir=None):
        if isinstance(paths, (str, bytes, os.PathLike)):
            raise StampError("paths must be one path per catalog row (a column), not a single path")
        self._paths = paths
        self._base = Path(base_dir) if base_dir is not None else None
        self.n_rows = len(paths)

    def path(self, row: int) -> Path | None:
        value = self._paths[row]
        if value is None or value is np.ma.masked:
            return None
        if isinstance(value, bytes):
            value = value.decode()
        value = str(value).strip()
        if not value:
            return None
        path = Path(value).expanduser()
        return self._base / path if self._base is not None and not path.is_absolute() else path

    def raw(self, row):
        path = self.path(row)
        if path is None:
            raise StampError("no image path for this row")
        return read_image_file(path), ()


def read_image_file(path, ext=None) -> np.ndarray:
    """Pixels of one image file: FITS (HDU ``ext``, default the first with data) as
    stored; 8-bit images as uint8 (RGB, or 2-D grey); 16-bit or float images as 2-D
    numbers to stretch. Raises ``StampError`` with a one-line reason."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if any(s in FITS_SUFFIXES for s in suffixes):
        return np.array(_fits_data(path, ext, memmap=False)[::-1])  # FITS is bottom-up
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode in ("RGB", "L"):
                return np.asarray(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return np.asarray(image).astype(np.float32)
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise StampError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise StampError(f"cannot read image {path}: {exc}") from None


def _fits_data(path, ext, *, memmap: bool, with_header: bool = False):
    """Data (and header) of a FITS HDU: ``ext`` or the first image HDU with data."""
    from astropy.io import fits

    try:
        with fits.open(path, memmap=memmap, lazy_load_hdus=True) as hdus:
            if ext is None:
                hdu = next((h for h in hdus if h.is_image and h.data is not None), None)
                if hdu is None:
                    raise StampError(f"no image data in any HDU of {path}")
            else:
                hdu = hdus[ext]
            data, header = hdu.data, hdu.header.copy()
    except StampError:
        raise
    except FileNotFoundError:
        raise StampError(f"file not found: {path}") from None
    except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise StampError(f"cannot read FITS file {path}: {exc}") from None
    if data is None:
        raise StampError(f"HDU {ext} of {path} holds no image data")
    return (data, header) if with_header else data


def _image_planes(image) -> list[np.ndarray]:
    """One 2-D plane per band (views where possible)."""
    if isinstance(image, (list, tuple)):
        planes = [np.asarray(p) for p in image]
        if len(planes) != 3 or any(p.ndim != 2 for p in planes):
            raise StampError("a sequence of band images must hold three 2-D images (red, "
                             "green, blue)")
        if len({p.shape for p in planes}) != 1:
            raise StampError(f"the three band images differ in shape: "
                             f"{', '.join(str(p.shape) for p in planes)}")
        return planes
    if not hasattr(image, "shape"):
        image = np.asarray(image)
    if image.ndim == 2:
        return [image]
    if image.ndim == 3 and image.shape[0] == 3:
        return [image[i] for i in range(3)]
    if image.ndim == 3 and image.shape[-1] == 3:
        return [image[..., i] for i in range(3)]
    raise StampError(f"the image must be 2-D (or three bands, 3 x H x W or H x W x 3); got "
                     f"a {image.ndim}-D array of shape {tuple(image.shape)}")


def _as_wcs(wcs):
    if wcs is None:
        return None
    from astropy.io.fits import Header
    from astropy.wcs import WCS

    if isinstance(wcs, Header):
        wcs = WCS(wcs)
    if not isinstance(wcs, WCS):
        raise StampError(f"wcs must be an astropy WCS or a FITS header, not {type(wcs).__name__}")
    if not wcs.has_celestial:
        raise StampError("the WCS has no celestial (RA/Dec) axes")
    return wcs.celestial


def _size_in_pixels(size, wcs) -> tuple[int, int]:
    """(ny, nx) from pixels or an angle."""
    import astropy.units as u

    if isinstance(size, u.Quantity):
        if size.unit == u.pix:
            size = size.value
        elif size.unit.physical_type == "angle":
            if wcs is None:
                raise StampError("a size given as an angle needs the image's WCS: pass "
                                 "wcs=..., or give the size in pixels")
            scale_x, scale_y = wcs.proj_plane_pixel_scales()
            side_y, side_x = np.broadcast_to(size.to_value(u.deg), (2,)) * u.deg
            size = [(side_y / scale_y).to_value(u.one), (side_x / scale_x).to_value(u.one)]
        else:
            raise StampError(f"size must be in pixels or an angle such as arcsec, not {size.unit}")
    sides = np.atleast_1d(np.asarray(size, dtype=float))
    if sides.size not in (1, 2) or not np.all(np.isfinite(sides)):
        raise StampError(f"size must be one number (square) or (ny, nx); got {size!r}")
    ny, nx = (int(round(s)) for s in np.broadcast_to(sides, (2,)))
    if ny < 1 or nx < 1:
        raise StampError(f"the stamp size must be at least 1 pixel; got {size!r}")
    return ny, nx


def _degrees(value) -> np.ndarray:
    import astropy.units as u

    if isinstance(value, u.Quantity):
        try:
            return np.atleast_1d(value.to_value(u.deg))
        except u.UnitConversionError:
            raise StampError(f"sky positions must be angles, not {value.unit}") from None
    return np.atleast_1d(np.asarray(value, dtype=float))


def _paired_arrays(name_a, a, name_b, b) -> tuple[np.ndarray, np.ndarray]:
    """Two equal-length float arrays; masked entries (missing positions) become NaN."""
    a = np.atleast_1d(np.ma.filled(np.ma.asarray(a, dtype=float), np.nan))
    b = np.atleast_1d(np.ma.filled(np.ma.asarray(b, dtype=float), np.nan))
    if a.ndim != 1 or a.shape != b.shape:
        raise StampError(f"{name_a} has {a.size} values and {name_b} has {b.size}: give one "
                         f"{name_a} and one {name_b} per catalog row")
    return a, b


def _sky_to_pixel(wcs, ra_deg, dec_deg) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions of ICRS RA/Dec (converted to the WCS's frame)."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    coords = SkyCoord(ra_deg * u.deg, dec_deg * u.deg, frame="icrs")
    x, y = wcs.world_to_pixel(coords)
    return np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))


# ----------------------------------------------------------------------- preparation

def prepare_stamp(raw: np.ndarray, settings: StampSettings) -> tuple[np.ndarray, tuple[str, ...]]:
    """One raw cutout -> uint8 (H, W, 3) pixels and flags.

    uint8 input is display-ready and passes through (grey repeated to RGB, alpha
    dropped). Other input is stretched: one band over the settings' interval, repeated
    to RGB; three bands (H x W x 3 or 3 x H x W, red first) by ``settings.rgb``.
    Non-finite pixels are filled with the median of the finite ones (``nan-filled``);
    a flat stamp comes out black (``constant``); one larger than ``max_size`` is shrunk
    with a Lanczos filter (``shrunk``).
    """
    data = _as_image(raw)
    flags: list[str] = []
    if data.dtype == np.uint8:
        pixels = np.array(np.broadcast_to(data[..., None], data.shape + (3,))
                          if data.ndim == 2 else data, dtype=np.uint8, order="C")
        if pixels.min() == pixels.max():
            flags.append("constant")
    else:
        data = np.array(data, dtype=np.result_type(data.dtype, np.float32))
        if _fill_non_finite(data):
            flags.append("nan-filled")
        if data.ndim == 2:
            band, constant = _stretch_band(data, settings)
            pixels = np.repeat(band[..., None], 3, axis=2)
        elif settings.rgb == "lupton":
            pixels, constant = _lupton(data, settings)
        else:
            bands = [_stretch_band(data[..., i], settings) for i in range(3)]
            pixels = np.stack([b for b, _ in bands], axis=-1)
            constant = all(c for _, c in bands)
        if constant:
            flags.append("constant")
    if settings.max_size is not None and max(pixels.shape[:2]) > settings.max_size:
        pixels = _shrink(pixels, int(settings.max_size))
        flags.append("shrunk")
    return pixels, tuple(flags)


def _as_image(raw) -> np.ndarray:
    """2-D, or H x W x 3 with bands last."""
    data = np.asarray(raw)
    if data.ndim == 3:
        if data.shape[-1] == 4:
            data = data[..., :3]
        elif data.shape[-1] == 1:
            data = data[..., 0]
        elif data.shape[-1] != 3 and data.shape[0] in (1, 3):
            data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    if not (data.ndim == 2 or (data.ndim == 3 and data.shape[-1] == 3)):
        raise StampError(f"a stamp must be 2-D or have three bands; got shape {data.shape}")
    if data.size == 0:
        raise StampError(f"the stamp is empty (shape {data.shape})")
    if data.dtype.kind not in "biuf":
        raise StampError(f"stamp pixels must be numbers, not {data.dtype}")
    return data


def _fill_non_finite(data: np.ndarray) -> bool:
    """Fill NaN/inf in place with each band's finite median; True if any were found."""
    bad = ~np.isfinite(data)
    if not bad.any():
        return False
    bands = [(data, bad)] if data.ndim == 2 else [(data[..., i], bad[..., i]) for i in range(3)]
    for band, band_bad in bands:
        good = band[~band_bad]
        band[band_bad] = np.median(good) if good.size else 0.0
    return True


def _interval(settings: StampSettings):
    from astropy.visualization import PercentileInterval, ZScaleInterval

    if settings.interval == "zscale":
        return ZScaleInterval()
    return PercentileInterval(settings.percentile)


def _stretch(settings: StampSettings):
    from astropy.visualization import AsinhStretch, LinearStretch, LogStretch, SqrtStretch

    return {"asinh": AsinhStretch, "log": LogStretch, "sqrt": SqrtStretch,
            "linear": LinearStretch}[settings.stretch]()


def _limits(data: np.ndarray, settings: StampSettings) -> tuple[float, float]:
    """The interval's limits; the full range when the interval collapses (a few bright
    pixels on a flat background); equal limits only for a flat stamp."""
    vmin, vmax = _interval(settings).get_limits(data)
    if not vmax > vmin:
        vmin, vmax = float(data.min()), float(data.max())
    return float(vmin), float(vmax)


def _stretch_band(data: np.ndarray, settings: StampSettings) -> tuple[np.ndarray, bool]:
    """One finite band -> uint8 (H, W) and whether it was flat."""
    vmin, vmax = _limits(data, settings)
    if not vmax > vmin:
        return np.zeros(data.shape, np.uint8), True
    scaled = np.subtract(data, vmin)
    scaled /= vmax - vmin
    np.clip(scaled, 0.0, 1.0, out=scaled)
    stretched = _stretch(settings)(scaled, clip=True, out=scaled)
    return _to_uint8(stretched), False


def _lupton(data: np.ndarray, settings: StampSettings) -> tuple[np.ndarray, bool]:
    """Three finite bands -> colour-preserving RGB (Lupton et al. 2004 via
    ``make_lupton_rgb``): each band's lower limit is its black point; the settings'
    stretch maps the joint intensity from 0 to its upper limit onto 0..1."""
    from astropy.visualization import (CompositeStretch, LinearStretch, ManualInterval,
                                       make_lupton_rgb)

    bands = [data[..., i] for i in range(3)]
    floors = [_limits(band, settings)[0] for band in bands]
    intensity = sum(band - floor for band, floor in zip(bands, floors)) / 3.0
    _, top = _limits(intensity, settings)
    if not top > 0:
        top = float(intensity.max())
    if not top > 0:
        return np.zeros(data.shape, np.uint8), True
    stretch = CompositeStretch(LinearStretch(slope=1.0 / top), _stretch(settings))
    with np.errstate(invalid="ignore", divide="ignore"):
        rgb = make_lupton_rgb(*bands, interval=[ManualInterval(vmin=f) for f in floors],
                              stretch_object=stretch)
    return np.ascontiguousarray(rgb), False


def _to_uint8(values: np.ndarray) -> np.ndarray:
    values *= 255.0
    values += 0.5
    return values.astype(np.uint8)


def _shrink(pixels: np.ndarray, max_size: int) -> np.ndarray:
    """Scale so the longer side is ``max_size``, keeping the aspect ratio."""
    from PIL import Image

    height, width = pixels.shape[:2]
    scale = max_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(pixels, "RGB").resize(size, Image.Resampling.LANCZOS,
                                                  reducing_gap=3.0)
    return np.asarray(image)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of uint8 (H, W, 3) pixels; decoded as RGB they are the same pixels.
    A grey stamp (three equal channels) is written as 8-bit greyscale, which encodes
    about twice as fast; compression level 1 is faster and smaller than the default
    on noisy sky (see BENCHMARKS.md)."""
    from PIL import Image

    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise StampError(f"encode_png needs uint8 H x W x 3 pixels, got {pixels.dtype} "
                         f"{pixels.shape}")
    red = pixels[..., 0]
    if np.array_equal(red, pixels[..., 1]) and np.array_equal(red, pixels[..., 2]):
        image = Image.fromarray(np.ascontiguousarray(red), "L")
    else:
        image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ------------------------------------------------------------------------- streaming

#: rows prepared per task; small enough to keep look-ahead memory tiny
CHUNK_ROWS = 32


def _make_stamp(source: StampSource, index: int, row: int, settings: StampSettings) -> Stamp:
    try:
        raw, source_flags = source.raw(row)
        pixels, flags = prepare_stamp(raw, settings)
    except StampError as exc:
        return Stamp(index=index, row=row, pixels=None, error=str(exc))
    png = encode_png(pixels) if settings.encode_png else None
    return Stamp(index=index, row=row, pixels=pixels, png=png,
                 flags=tuple(source_flags) + flags)


def _prepare_chunk(source, start: int, rows: np.ndarray, settings) -> list[Stamp]:
    return [_make_stamp(source, start + i, int(row), settings) for i, row in enumerate(rows)]


def default_workers() -> int:
    """Background threads for stamp preparation. One: it overlaps preparation with the
    engine's work; a second thread only adds GIL contention (measured in
    BENCHMARKS.md, "Stamps"), and one thread already outruns every engine."""
    return 1


def look_ahead_chunks(workers: int) -> int:
    """Chunks prepared ahead of the consumer: enough to cover an engine call."""
    return max(4, 2 * workers)


def iter_stamps(source: StampSource, rows: Sequence[int], settings: StampSettings, *,
                workers: int | None = None, look_ahead: int = 0) -> Iterator[Stamp]:
    """Stamps for catalog ``rows`` of ``source``, in order (``Stamp.index`` is the
    position in ``rows``). Streams: ``workers`` background threads (default
    ``default_workers()``; 0 prepares in the caller's thread) prepare at most
    ``look_ahead_chunks(workers)`` chunks of ``CHUNK_ROWS`` ahead, or ``look_ahead``
    rows if that is more (a consumer that takes stamps in engine batches asks for one
    batch, so the next batch is ready when the engine is), so preparation
    overlaps the engine's work. A row without a stamp comes back with ``error`` set;
    iteration goes on. Raises ``StampError`` up front for rows outside the source."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= source.n_rows):
        bad = rows[(rows < 0) | (rows >= source.n_rows)][0]
        raise StampError(f"row {bad} is outside the stamp source, which has "
                         f"{source.n_rows} rows (0..{source.n_rows - 1})")
    workers = default_workers() if workers is None else max(0, int(workers))
    chunks = ((start, rows[start:start + CHUNK_ROWS])
              for start in range(0, len(rows), CHUNK_ROWS))
    if workers == 0:
        for start, part in chunks:
            yield from _prepare_chunk(source, start, part, settings)
        return
    ahead = max(look_ahead_chunks(workers), -(-int(look_ahead) // CHUNK_ROWS))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="glue-vlm-stamps")
    pending: deque = deque()
    try:
        for start, part in chunks:
            pending.append(pool.submit(_prepare_chunk, source, start, part, settings))
            if len(pending) >= ahead:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
