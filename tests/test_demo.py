"""The demo catalog: real sources detected in the Hubble Deep Field image."""

import numpy as np
import pytest
from astropy.table import Table

from glue_vlm.cli import main
from glue_vlm.demo import demo_image


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo.ecsv"
    assert main(["demo", "--no-gui", "-o", str(out)]) == 0
    return Table.read(out), np.load(out.with_name("demo_stamps.npy"))


def test_finds_hundreds_of_sources_with_stamps(demo_files):
    table, stamps = demo_files
    assert 300 <= len(table) <= 5000
    assert stamps.shape == (len(table), 64, 64, 3) and stamps.dtype == np.uint8
    for name in ("x", "y", "area", "flux", "surface_brightness", "half_light_radius",
                 "concentration", "ellipticity"):
        assert name in table.colnames


def test_positions_land_on_flux_peaks(demo_files):
    table, stamps = demo_files
    gray = demo_image().astype(float).sum(axis=2)
    brightest = np.argsort(-np.asarray(table["flux"]))[:10]
    for row in brightest:
        x, y = float(table["x"][row]), float(table["y"][row])
        xi, yi = int(round(x)), int(round(y))
        box = gray[yi - 8:yi + 9, xi - 8:xi + 9]
        py, px = np.unravel_index(np.argmax(box), box.shape)
        assert abs(py - 8) <= 3 and abs(px - 8) <= 3, (row, x, y)
        # the stamp is centred on the same peak
        stamp = stamps[row].astype(float).sum(axis=2)
        centre = stamp[28:36, 28:36].mean()
        assert centre > np.median(stamp) + 50
