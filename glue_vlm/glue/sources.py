"""Glue data -> what the core runs on: catalog row indices and stamp sources.

Three ways a catalog finds its imaging inside Glue:

- an image dataset plus positions: the catalog's links to the image (glue computes the
  image pixel position of every catalog row through pixel or world-coordinate links),
  pixel columns, or RA/Dec columns through the image's WCS;
- a stamp-cube dataset whose first axis is the catalog row;
- a catalog column of image file paths.

Nothing here writes to glue; everything reads arrays and hands them to
:mod:`glue_vlm.stamps`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..stamps import CubeSource, ImageSource, PathSource

__all__ = ["GlueInputError", "rows_of", "selection_rows", "image_source", "cube_source",
           "path_source", "parse_size", "catalog_directory", "band_components", "RGB",
           "POSITIONS"]

#: the pseudo-attribute meaning "the red, green and blue components together"
RGB = "rgb"
BANDS = ("red", "green", "blue")
#: where an image source takes the stamp centres from
POSITIONS = ("linked", "pixel", "sky")


class GlueInputError(ValueError):
    """The chosen rows or imaging cannot work; the message says what to do."""


# -- rows ------------------------------------------------------------------------------
def rows_of(catalog, rows=None) -> np.ndarray:
    """Catalog row indices from ``rows``: None (all rows), a glue subset or subset
    group, a subset state (``catalog.id['mag'] < 20``), a boolean mask, or row
    numbers. Raises ``GlueInputError`` when empty."""
    from glue.core.subset import Subset, SubsetState
    from glue.core.subset_group import SubsetGroup

    n = catalog.shape[0]
    if rows is None:
        index = np.arange(n)
    elif isinstance(rows, SubsetState):
        index = np.flatnonzero(rows.to_mask(catalog))
    elif isinstance(rows, SubsetGroup):
        index = rows_of(catalog, _subset_on(rows, catalog))
    elif isinstance(rows, Subset):
        if rows.data is not catalog:
            raise GlueInputError(f"subset {rows.label!r} belongs to {rows.data.label!r}, "
                                 f"not to the catalog {catalog.label!r}")
        index = np.flatnonzero(rows.to_mask())
    else:
        array = np.asarray(rows)
        if array.dtype == bool:
            if array.shape != (n,):
                raise GlueInputError(f"a row mask needs {n} values, got {array.size}")
            index = np.flatnonzero(array)
        else:
            index = array.astype(np.int64).ravel()
            if index.size and (index.min() < 0 or index.max() >= n):
                raise GlueInputError(f"row numbers must be in 0..{n - 1}")
    if index.size == 0:
        raise GlueInputError("no rows selected: select some rows of "
                             f"{catalog.label!r} (or choose all rows)")
    return index


def _subset_on(group, catalog):
    for subset in group.subsets:
        if subset.data is catalog:
            return subset
    raise GlueInputError(f"subset {group.label!r} has no part on {catalog.label!r}")


def selection_rows(edit_subsets, catalog) -> np.ndarray:
    """Rows of ``catalog`` in the current selection (glue's edit subsets, a list of
    subset groups), united."""
    mask = np.zeros(catalog.shape[0], dtype=bool)
    found = False
    for group in edit_subsets or ():
        for subset in group.subsets:
            if subset.data is catalog:
                mask |= np.asarray(subset.to_mask(), dtype=bool)
                found = True
    if not found:
        raise GlueInputError(f"nothing is selected on {catalog.label!r}: draw a selection "
                             "in a plot of the catalog, or pick a subset or all rows")
    return rows_of(catalog, mask)


# -- image + positions -------------------------------------------------------------------
def band_components(data):
    """The red, green and blue components of ``data`` (glue's colour-image loader names
    them so), or None."""
    by_label = {cid.label.lower(): cid for cid in data.main_components}
    if all(band in by_label for band in BANDS):
        return [by_label[band] for band in BANDS]
    return None


def _planes(data, attribute, what: str):
    """Arrays of ``attribute`` of ``data``: one component, or the three bands."""
    # (a ComponentID compared with == gives a subset state, hence isinstance)
    wants_rgb = isinstance(attribute, str) and attribute == RGB
    if attribute is None or wants_rgb:
        bands = band_components(data)
        if bands is not None:
            return [data.get_component(cid).data for cid in bands]
        numeric = [cid for cid in data.main_components if data.get_component(cid).numeric]
        if len(numeric) != 1 or wants_rgb:
            names = ", ".join(cid.label for cid in numeric) or "none"
            raise GlueInputError(f"choose which component of {data.label!r} holds the "
                                 f"{what} (numeric components: {names})")
        attribute = numeric[0]
    cid = _cid(data, attribute)
    return data.get_component(cid).data


def _cid(data, attribute):
    from glue.core.component_id import ComponentID

    if isinstance(attribute, ComponentID):
        if attribute not in data.components:
            raise GlueInputError(f"{attribute.label!r} is not a component of {data.label!r}")
        return attribute
    cid = data.find_component_id(attribute)
    if cid is None:
        raise GlueInputError(f"{data.label!r} has no component {attribute!r}")
    return cid


def _column(catalog, attribute, what: str) -> np.ndarray:
    if attribute is None:
        raise GlueInputError(f"choose the catalog column with the {what}")
    return np.asarray(catalog[_cid(catalog, attribute)], dtype=float)


def parse_size(size):
    """Cutout size: pixels (64, "64") or an angle ("20arcsec", a Quantity)."""
    from astropy import units as u

    if isinstance(size, u.Quantity):
        return size
    text = str(size).strip()
    try:
        pixels = int(text)
    except ValueError:
        try:
            return u.Quantity(text).to(u.arcsec)
        except (TypeError, ValueError, u.UnitsError):
            raise GlueInputError(f"cutout size {text!r}: give pixels (64) or an angle "
                                 "(20 arcsec)") from None
    if pixels < 4:
        raise GlueInputError(f"cutout size {pixels} px is too small: use at least 4")
    return pixels


def image_source(catalog, image, *, size=64, positions: str = "linked", x=None, y=None,
                 ra=None, dec=None, attribute=None) -> ImageSource:
    """Cutouts of ``image`` centred on each catalog row.

    ``positions``: ``linked`` (the catalog is linked to the image in glue, through
    pixel or world coordinates), ``pixel`` (``x``/``y`` catalog columns, 0-based image
    pixels) or ``sky`` (``ra``/``dec`` catalog columns in degrees, through the image's
    WCS). ``attribute``: the image component with the pixels, or ``"rgb"`` for the
    red, green and blue components together (the default when the image has them).
    """
    from glue.core.exceptions import IncompatibleAttribute

    if image.ndim != 2:
        raise GlueInputError(f"{image.label!r} is not a 2-D image (shape {image.shape}); "
                             "for a stack of stamps choose the stamp-cube source")
    planes = _planes(image, attribute, "pixels")
    size = parse_size(size)
    if positions == "linked":
        try:
            px = np.asarray(catalog[image.pixel_component_ids[1]], dtype=float)
            py = np.asarray(catalog[image.pixel_component_ids[0]], dtype=float)
        except IncompatibleAttribute:
            raise GlueInputError(
                f"no image linked to the catalog: link {catalog.label!r}'s positions to "
                f"{image.label!r} (Data > Link Data: RA/Dec to its world coordinates, or "
                "x/y to its pixels), or choose position columns") from None
        return ImageSource(planes, size=size, x=px, y=py, wcs=_wcs(image))
    if positions == "pixel":
        return ImageSource(planes, size=size, x=_column(catalog, x, "x pixel position"),
                           y=_column(catalog, y, "y pixel position"), wcs=_wcs(image))
    if positions == "sky":
        wcs = _wcs(image)
        if wcs is None:
            raise GlueInputError(f"{image.label!r} has no celestial WCS: use pixel "
                                 "positions, or link the catalog to the image")
        return ImageSource(planes, size=size, ra=_column(catalog, ra, "RA (deg)"),
                           dec=_column(catalog, dec, "Dec (deg)"), wcs=wcs)
    raise GlueInputError(f"positions must be one of {', '.join(POSITIONS)}, "
                         f"not {positions!r}")


def _wcs(image):
    """The image's astropy WCS when it has celestial axes, else None."""
    from astropy.wcs import WCS

    coords = getattr(image, "coords", None)
    if isinstance(coords, WCS) and coords.has_celestial:
        return coords
    return None


# -- stamp cube ------------------------------------------------------------------------
class _StackedBands:
    """Three N x H x W cubes seen as one N x H x W x 3 cube, read a row at a time."""

    def __init__(self, bands):
        self._bands = bands
        self.shape = tuple(bands[0].shape) + (3,)

    def __getitem__(self, row):
        return np.stack([np.asarray(band[row]) for band in self._bands], axis=-1)


def cube_source(cube, n_rows: int, attribute=None) -> CubeSource:
    """Stamps from a dataset whose first axis is the catalog row (N x H x W, or
    N x H x W x 3); ``attribute`` as in :func:`image_source`."""
    if cube.ndim not in (3, 4):
        raise GlueInputError(f"{cube.label!r} is not a stamp cube (shape {cube.shape}): "
                             "it needs N x H x W with the catalog row first")
    planes = _planes(cube, attribute, "stamps")
    array = _StackedBands(planes) if isinstance(planes, list) else planes
    if array.shape[0] != n_rows:
        raise GlueInputError(f"{cube.label!r} holds {array.shape[0]} stamps but the "
                             f"catalog has {n_rows} rows: its first axis must be the row")
    return CubeSource(array, n_rows=n_rows)


# -- file paths -------------------------------------------------------------------------
def catalog_directory(catalog) -> Path | None:
    """Directory of the file the catalog was loaded from, if glue knows it."""
    log = getattr(catalog, "_load_log", None)
    path = getattr(log, "path", None)
    return Path(path).parent if path else None


def path_source(catalog, column, base_dir=None) -> PathSource:
    """One image file per row, named in ``column``; relative paths are taken from
    ``base_dir`` (default: the catalog file's directory)."""
    if column is None:
        raise GlueInputError("choose the catalog column with the image file paths")
    component = catalog.get_component(_cid(catalog, column))
    values = component.labels if getattr(component, "categorical", False) \
        else np.asarray(component.data)
    if values.dtype.kind not in "USO":
        raise GlueInputError(f"column {getattr(column, 'label', column)!r} holds "
                             f"{values.dtype} values, not file paths")
    base = Path(base_dir) if base_dir else catalog_directory(catalog)
    return PathSource(values, base_dir=base)
