"""The demo data: the Hubble Deep Field colour image that ships with scikit-image, and
a source catalog detected from it with photutils (segmentation + deblending)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

__all__ = ["demo_image", "detect_sources", "write_demo"]

STAMP_SIZE = 64


def demo_image() -> np.ndarray:
    """The HDF colour image as uint8 (H, W, 3), row 0 at the bottom (the FITS and Glue
    convention, so pixel y grows upwards as in the image viewer)."""
    from skimage.data import hubble_deep_field

    return np.ascontiguousarray(hubble_deep_field()[::-1])


def detect_sources(rgb: np.ndarray, nsigma: float = 3.0, npixels: int = 10):
    """Segment and deblend the summed-band image; one row per source with position
    (0-based pixels), area, fluxes and shape measurements."""
    from astropy.convolution import convolve
    from astropy.table import Table
    from photutils.background import Background2D, MedianBackground
    from photutils.segmentation import (SourceCatalog, deblend_sources, detect_sources,
                                        make_2dgaussian_kernel)

    gray = rgb.astype(np.float32).mean(axis=2)
    background = Background2D(gray, (50, 50), filter_size=(3, 3),
                              bkg_estimator=MedianBackground())
    data = gray - background.background
    smoothed = convolve(data, make_2dgaussian_kernel(2.0, size=5))
    segments = detect_sources(smoothed, nsigma * background.background_rms,
                              n_pixels=npixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deblending chatter about small segments
        segments = deblend_sources(smoothed, segments, n_pixels=npixels, nlevels=32,
                                   contrast=0.005, progress_bar=False)
    catalog = SourceCatalog(data, segments, convolved_data=smoothed)
    r20, r50, r80 = (np.asarray(catalog.flux_radius(f).value) for f in (0.2, 0.5, 0.8))
    flux = np.asarray(catalog.segment_flux)
    area = np.asarray(catalog.area.value)
    table = Table({
        "id": np.asarray(catalog.label),
        "x": np.asarray(catalog.x_centroid),
        "y": np.asarray(catalog.y_centroid),
        "area": area,
        "flux": flux,
        "mag": -2.5 * np.log10(np.clip(flux, 1e-3, None)),
        "surface_brightness": -2.5 * np.log10(np.clip(flux / area, 1e-6, None)),
        "half_light_radius": r50,
        "concentration": r80 / np.where(r20 > 0, r20, np.nan),
        "ellipticity": np.asarray(catalog.ellipticity.value),
        "gini": np.asarray(catalog.gini),
    })
    table.meta["source"] = ("Hubble Deep Field colour image (scikit-image); sources "
                            "detected with photutils segmentation + deblending")
    return table


def write_demo(output: str | Path) -> tuple[Path, Path]:
    """Write the demo catalog to ``output`` (any astropy table format) and its stamps,
    row-aligned, to ``<output stem>_stamps.npy``; returns both paths."""
    from .stamps import ImageSource, StampSettings, iter_stamps

    output = Path(output)
    rgb = demo_image()
    table = detect_sources(rgb)
    source = ImageSource(rgb, size=STAMP_SIZE, x=np.asarray(table["x"]),
                         y=np.asarray(table["y"]))
    cube = np.zeros((len(table), STAMP_SIZE, STAMP_SIZE, 3), dtype=np.uint8)
    for stamp in iter_stamps(source, np.arange(len(table)), StampSettings()):
        cube[stamp.index] = stamp.pixels
    stamps_path = output.with_name(output.stem + "_stamps.npy")
    table.meta["stamps"] = stamps_path.name
    table.write(output, overwrite=True)
    np.save(stamps_path, cube)
    return output, stamps_path


#: a LLaVA-family model small enough for a laptop CPU (0.9 B parameters, ~1.8 GB)
SMALL_LOCAL_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
FULL_LOCAL_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"


def _cached(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def _has_cuda() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pick_engine(environ=None) -> tuple[str, str, str]:
    """The engine the demo starts with: ``(engine kind, model, note for the user)``.

    GPT-4o when ``OPENAI_API_KEY`` is set; LLaVA-NeXT 7B when its weights are cached and
    a GPU is present; else the small LLaVA-OneVision model (on the CPU), with a note
    saying it will be downloaded first if it is not cached, or, offline
    (``HF_HUB_OFFLINE``), how to get it or another engine.
    """
    import os

    environ = os.environ if environ is None else environ
    if environ.get("OPENAI_API_KEY"):
        return "gpt-4o", "gpt-4o", "GPT-4o: OPENAI_API_KEY is set. Estimate the cost first."
    if _cached(FULL_LOCAL_MODEL) and _has_cuda():
        return "local", FULL_LOCAL_MODEL, "LLaVA-NeXT 7B on your GPU (weights cached)."
    if _cached(SMALL_LOCAL_MODEL):
        return "local", SMALL_LOCAL_MODEL, "Small LLaVA-OneVision model on the CPU."
    if environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "local", SMALL_LOCAL_MODEL, (
            "No engine is ready: set OPENAI_API_KEY for GPT-4o, or download the small "
            f"local model once (about 1.8 GB): hf download {SMALL_LOCAL_MODEL}")
    return "local", SMALL_LOCAL_MODEL, (
        f"Small local model {SMALL_LOCAL_MODEL}: Classify downloads it first from the "
        "Hugging Face Hub (about 1.8 GB, once). Without internet, set OPENAI_API_KEY "
        "for GPT-4o instead.")
