"""Stamps: the three sources, normalisation, resizing, PNG, streaming."""

from __future__ import annotations

import contextlib
import io
import warnings

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS
from hypothesis import given, settings as hyp_settings, strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from glue_vlm.stamps import (CHUNK_ROWS, CubeSource, ImageSource, PathSource, StampError,
                             StampSettings, encode_png, iter_stamps, look_ahead_chunks,
                             prepare_stamp)

RNG = np.random.default_rng(42)
PIXEL_ARCSEC = 0.25


def gaussian(shape, x0, y0, sigma=2.0, amplitude=100.0):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return amplitude * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma ** 2))


def tan_wcs(shape):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    wcs.wcs.cdelt = [-PIXEL_ARCSEC / 3600, PIXEL_ARCSEC / 3600]
    wcs.wcs.radesys = "ICRS"
    return wcs


def brightest(pixels):
    """(y, x) of the brightest pixel of a uint8 RGB stamp."""
    return np.unravel_index(np.argmax(pixels.astype(int).sum(axis=2)), pixels.shape[:2])


@contextlib.contextmanager
def no_warnings():
    """Any warning (e.g. a division by zero) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------- settings / errors

@pytest.mark.parametrize("field, value, hint", [
    ("stretch", "cubic", "asinh, log, sqrt, linear"),
    ("interval", "minmax", "percentile, zscale"),
    ("rgb", "rainbow", "lupton, per-band"),
    ("percentile", 0, "percentile"),
    ("max_size", 0, "max_size"),
])
def test_bad_settings_name_what_to_use(field, value, hint):
    with pytest.raises(StampError, match=hint):
        StampSettings(**{field: value})


# ------------------------------------------------------------------------ CubeSource

def test_float_cube_rows_keep_their_own_stamp():
    cube = RNG.normal(size=(5, 24, 24)).astype(np.float32)
    spots = [(3, 20), (10, 4), (17, 17), (5, 5), (21, 9)]
    for i, (y, x) in enumerate(spots):
        cube[i, y, x] = 50.0
    stamps = list(iter_stamps(CubeSource(cube), [4, 0, 2], StampSettings(percentile=100),
                              workers=0))
    assert [(s.index, s.row) for s in stamps] == [(0, 4), (1, 0), (2, 2)]
    for s in stamps:
        assert s.pixels.dtype == np.uint8 and s.pixels.shape == (24, 24, 3)
        assert np.array_equal(s.pixels[..., 0], s.pixels[..., 2])
        assert tuple(brightest(s.pixels)) == spots[s.row]
        assert s.png is None and s.error is None


def test_uint8_rgb_cube_passes_through_unchanged():
    cube = RNG.integers(0, 256, size=(4, 16, 20, 3), dtype=np.uint8)
    stamps = list(iter_stamps(CubeSource(cube), range(4), StampSettings(), workers=0))
    for s in stamps:
        assert np.array_equal(s.pixels, cube[s.row])
        assert s.flags == ()


def test_channels_first_cube_is_three_bands_red_first():
    cube = np.zeros((2, 3, 16, 16), np.float32) + RNG.normal(0, 0.01, (2, 3, 16, 16))
    cube[0, 0] += gaussian((16, 16), 8, 8)          # red-only source
    cube[1, 2] += gaussian((16, 16), 8, 8)          # blue-only source
    red, blue = (s.pixels[8, 8] for s in iter_stamps(CubeSource(cube), [0, 1],
                                                      StampSettings(), workers=0))
    assert red[0] > 200 and red[1] < 50 and red[2] < 50
    assert blue[2] > 200 and blue[0] < 50 and blue[1] < 50


def test_memmapped_cubes_read_like_arrays(tmp_path):
    cube = RNG.normal(size=(6, 12, 12)).astype(np.float32)
    np.save(tmp_path / "cube.npy", cube)
    fits.writeto(tmp_path / "cube.fits", cube)
    rows = [5, 1, 3]
    expected = [s.pixels for s in iter_stamps(CubeSource(cube), rows, StampSettings(),
                                              workers=0)]
    for name, flip in (("cube.npy", False), ("cube.fits", True)):
        source = CubeSource.from_file(tmp_path / name, n_rows=6)
        got = [s.pixels for s in iter_stamps(source, rows, StampSettings(), workers=0)]
        # FITS stamps are bottom-up: they come out flipped, top row first
        want = [e[::-1] if flip else e for e in expected]
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), name


def test_image_cutouts_come_out_top_row_first():
    image = np.zeros((40, 40), np.float32)
    image[30, 20] = 100.0  # a source high in the image (y = 30 grows upwards)
    source = ImageSource(image, size=21, x=[20.0], y=[20.0])
    stamp, _ = source.raw(0)
    row, col = np.unravel_index(np.argmax(stamp), stamp.shape)
    assert (row, col) == (0, 10)  # above the centre: near the top of the stamp


@pytest.mark.parametrize("cube, n_rows, hint", [
    (np.zeros((5, 8, 8)), 6, "first axis must be the catalog row"),
    (np.zeros((8, 8)), None, "N x H x W"),
    (np.zeros((2, 2, 8, 8, 3)), None, "N x H x W"),
    (np.zeros((5, 8, 8, 2)), None, "3 bands"),
])
def test_bad_cube_says_what_shape_is_needed(cube, n_rows, hint):
    with pytest.raises(StampError, match=hint):
        CubeSource(cube, n_rows=n_rows)


def test_missing_cube_file_is_one_clear_error(tmp_path):
    with pytest.raises(StampError, match="file not found"):
        CubeSource.from_file(tmp_path / "nope.fits")


# ----------------------------------------------------------------------- ImageSource

@pytest.fixture(scope="module")
def sky_image():
    """A 300 x 400 noise image with a TAN WCS and three Gaussians at known pixels."""
    shape = (300, 400)
    wcs = tan_wcs(shape)
    image = RNG.normal(0, 1, shape).astype(np.float32)
    centres = [(123.0, 211.0), (350.0, 40.0), (60.0, 150.0)]   # (x, y)
    for x0, y0 in centres:
        image += gaussian(shape, x0, y0).astype(np.float32)
    sky = wcs.pixel_to_world([c[0] for c in centres], [c[1] for c in centres])
    return image, wcs, centres, sky


@pytest.mark.parametrize("size", [33, 33 * PIXEL_ARCSEC * u.arcsec])
def test_sky_positions_land_the_source_at_the_stamp_centre(sky_image, size):
    image, wcs, centres, sky = sky_image
    source = ImageSource(image, size=size, ra=sky.ra.deg, dec=sky.dec.deg, wcs=wcs)
    assert source.size == (33, 33)
    for s in iter_stamps(source, range(3), StampSettings(percentile=100), workers=0):
        assert s.pixels.shape == (33, 33, 3)
        assert tuple(brightest(s.pixels)) == (16, 16)


def test_sky_positions_as_quantities_and_header_wcs(sky_image):
    image, wcs, centres, sky = sky_image
    source = ImageSource(image, size=21, ra=sky.ra, dec=sky.dec, wcs=wcs.to_header())
    np.testing.assert_allclose(source._x, [c[0] for c in centres], atol=1e-6)
    np.testing.assert_allclose(source._y, [c[1] for c in centres], atol=1e-6)


def test_pixel_positions_are_zero_based_x_then_y(sky_image):
    image, _, centres, _ = sky_image
    x, y = zip(*centres)
    source = ImageSource(image, size=15, x=x, y=y)
    for s in iter_stamps(source, range(3), StampSettings(percentile=100), workers=0):
        assert tuple(brightest(s.pixels)) == (7, 7)


def test_partial_overlap_is_padded_like_cutout2d_and_flagged(sky_image):
    image, _, _, _ = sky_image
    positions = [(2.0, 150.0), (398.0, 297.0), (200.0, 1.0)]
    source = ImageSource(image, size=(20, 30), x=[p[0] for p in positions],
                         y=[p[1] for p in positions])
    for row, position in enumerate(positions):
        raw, flags = source.raw(row)
        assert flags == ("edge-padded",)
        reference = Cutout2D(image, position, (20, 30), mode="partial",
                             fill_value=np.nan).data[::-1]  # stamps come top row first
        inside = np.isfinite(reference)
        assert raw.shape == (20, 30) and 0 < inside.sum() < raw.size
        assert np.array_equal(raw[inside], reference[inside])
        assert np.all(raw[~inside] == np.median(reference[inside]))


def test_no_overlap_is_a_row_error_and_iteration_goes_on(sky_image):
    image, _, _, _ = sky_image
    x = np.ma.MaskedArray([100, 1000, 50, np.nan, 7], mask=[0, 0, 0, 0, 1])
    source = ImageSource(image, size=16, x=x, y=[100, 1000, 60, 5, 5])
    stamps = list(iter_stamps(source, range(5), StampSettings(), workers=2))
    assert [s.row for s in stamps] == [0, 1, 2, 3, 4]
    assert stamps[0].pixels is not None and stamps[2].pixels is not None
    assert stamps[1].pixels is None and "outside the image" in stamps[1].error
    assert "400 x 300" in stamps[1].error
    for bad in stamps[3:]:
        assert bad.pixels is None and "no usable position" in bad.error


def test_three_band_image_as_three_arrays(sky_image):
    image, wcs, _, sky = sky_image
    faint = image * 0.5
    source = ImageSource([image, faint, faint], size=25, ra=sky.ra.deg, dec=sky.dec.deg,
                         wcs=wcs)
    stamp = next(iter_stamps(source, [0], StampSettings(), workers=0))
    r, g, b = stamp.pixels[12, 12].astype(int)
    assert g == b and 0.4 < g / r < 0.6    # Lupton keeps the colour ratio


@pytest.mark.parametrize("kwargs, hint", [
    (dict(image=np.zeros(100), size=5, x=[1], y=[1]), "must be 2-D"),
    (dict(image=np.zeros((2, 3, 50, 50)), size=5, x=[1], y=[1]), "must be 2-D"),
    (dict(image=np.zeros((50, 50)), size=5, ra=[150.0], dec=[2.0]), "need the image's WCS"),
    (dict(image=np.zeros((50, 50)), size=5 * u.arcsec, x=[1], y=[1]), "needs the image's WCS"),
    (dict(image=np.zeros((50, 50)), size=5, x=[1, 2, 3], y=[1, 2]), "one x and one y per"),
    (dict(image=np.zeros((50, 50)), size=5, x=[1]), "both x and y"),
    (dict(image=np.zeros((50, 50)), size=5, x=[1], y=[1], ra=[1], dec=[1]), "not both"),
    (dict(image=np.zeros((50, 50)), size=5), "give the stamp centres"),
    (dict(image=np.zeros((50, 50)), size=0, x=[1], y=[1]), "at least 1 pixel"),
    (dict(image=np.zeros((50, 50)), size=5 * u.kg, x=[1], y=[1]), "pixels or an angle"),
])
def test_bad_image_input_says_what_to_fix(kwargs, hint):
    image = kwargs.pop("image")
    with pytest.raises(StampError, match=hint):
        ImageSource(image, **kwargs)


def test_sky_positions_with_mismatched_lengths(sky_image):
    image, wcs, _, _ = sky_image
    with pytest.raises(StampError, match="one ra and one dec per"):
        ImageSource(image, size=5, ra=[150.0, 150.1], dec=[2.0], wcs=wcs)


# ------------------------------------------------------------------------ PathSource

def test_path_source_reads_fits_png_jpeg_and_reports_bad_rows(tmp_path):
    science = RNG.normal(size=(32, 32)).astype(np.float32) + gaussian((32, 32), 20, 9)
    fits.writeto(tmp_path / "a.fits", science)
    rgb = RNG.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "b.png")
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=90)
    (tmp_path / "d.png").write_bytes(b"not an image")
    paths = np.array(["a.fits", "b.png", "c.jpg", "missing.png", "d.png", ""])
    stamps = list(iter_stamps(PathSource(paths, base_dir=tmp_path), range(6),
                              StampSettings(percentile=100), workers=2))
    # FITS row 9 (from the bottom) is stamp row 32 - 1 - 9 = 22 (from the top)
    assert tuple(brightest(stamps[0].pixels)) == (22, 20)
    assert np.array_equal(stamps[1].pixels, rgb)
    assert np.array_equal(stamps[2].pixels, np.asarray(Image.open(tmp_path / "c.jpg")))
    assert "file not found" in stamps[3].error and "missing.png" in stamps[3].error
    assert "cannot read image" in stamps[4].error and "d.png" in stamps[4].error
    assert stamps[5].error == "no image path for this row"
    assert all(s.pixels is None for s in stamps[3:])


def test_fits_file_stamp_comes_from_the_first_image_hdu(tmp_path):
    science = RNG.normal(size=(16, 16)) + gaussian((16, 16), 4, 11)
    table = fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])
    fits.HDUList([fits.PrimaryHDU(), table, fits.ImageHDU(science)]).writeto(tmp_path / "s.fits")
    stamp = next(iter_stamps(PathSource(["s.fits"], base_dir=tmp_path), [0],
                             StampSettings(percentile=100), workers=0))
    assert tuple(brightest(stamp.pixels)) == (16 - 1 - 11, 4)  # FITS is bottom-up


def test_path_source_takes_bytes_and_absolute_paths(tmp_path):
    grey = RNG.integers(0, 256, size=(10, 10), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    source = PathSource([str(tmp_path / "g.png").encode()], base_dir="/elsewhere")
    stamp = next(iter_stamps(source, [0], StampSettings(), workers=0))
    assert np.array_equal(stamp.pixels, np.repeat(grey[..., None], 3, axis=2))


# ----------------------------------------------------------------- normalisation

def test_nan_and_inf_are_filled_with_the_median_and_flagged():
    data = RNG.normal(size=(20, 20))
    holes = data.copy()
    holes[3, 4], holes[10, 10], holes[0, 19] = np.nan, np.inf, -np.inf
    filled = holes.copy()
    filled[~np.isfinite(holes)] = np.median(holes[np.isfinite(holes)])
    with no_warnings():
        pixels, flags = prepare_stamp(holes, StampSettings())
    assert flags == ("nan-filled",)
    assert np.array_equal(pixels, prepare_stamp(filled, StampSettings())[0])


@pytest.mark.parametrize("raw, flags", [
    (np.full((16, 16), 7.5), ("constant",)),
    (np.full((16, 16), np.nan), ("nan-filled", "constant")),
    (np.full((16, 16, 3), 3.0), ("constant",)),
    (np.full((16, 16), 9, np.uint8), ("constant",)),
])
def test_constant_stamp_is_flagged_without_dividing_by_zero(raw, flags):
    with no_warnings():
        pixels, got = prepare_stamp(raw, StampSettings())
    assert got == flags
    assert pixels.shape == (16, 16, 3) and len(np.unique(pixels)) == 1


def test_one_bright_pixel_on_flat_sky_is_not_constant():
    data = np.zeros((64, 64))
    data[30, 31] = 10.0
    pixels, flags = prepare_stamp(data, StampSettings())
    assert flags == ()
    assert pixels[30, 31, 0] == 255 and pixels[0, 0, 0] == 0


def test_stretches_are_monotonic_and_differ_in_midtones():
    ramp = np.tile(np.linspace(0, 1, 101), (4, 1))
    mids = {}
    for name in ("linear", "sqrt", "asinh", "log"):
        pixels, _ = prepare_stamp(ramp, StampSettings(stretch=name, percentile=100))
        row = pixels[0, :, 0].astype(int)
        assert np.all(np.diff(row) >= 0) and row[0] == 0 and row[-1] == 255, name
        mids[name] = row[25]
    assert mids["linear"] < mids["sqrt"] < mids["asinh"] < mids["log"]
    assert abs(mids["linear"] - 64) <= 1


def test_zscale_interval_differs_from_percentile():
    data = RNG.normal(size=(64, 64)) + gaussian((64, 64), 32, 32, amplitude=1000)
    z, _ = prepare_stamp(data, StampSettings(interval="zscale"))
    p, _ = prepare_stamp(data, StampSettings(interval="percentile"))
    assert z[32, 32, 0] == 255
    assert np.median(z) > np.median(p)   # zscale saturates the source, shows the sky


def test_lupton_keeps_colour_and_per_band_does_not():
    source = gaussian((32, 32), 16, 16) + RNG.normal(0, 0.1, (32, 32))
    cube = np.stack([source, 0.5 * source, 0.25 * source], axis=-1)
    lupton, _ = prepare_stamp(cube, StampSettings(rgb="lupton"))
    per_band, _ = prepare_stamp(cube, StampSettings(rgb="per-band"))
    r, g, b = lupton[16, 16].astype(float)
    assert abs(g / r - 0.5) < 0.05 and abs(b / r - 0.25) < 0.05
    assert np.all(per_band[16, 16] >= 250)


def test_grey_and_rgba_uint8_pass_through():
    grey = RNG.integers(0, 256, size=(9, 7), dtype=np.uint8)
    pixels, _ = prepare_stamp(grey, StampSettings())
    assert np.array_equal(pixels, np.dstack([grey, grey, grey]))
    rgba = RNG.integers(0, 256, size=(9, 7, 4), dtype=np.uint8)
    assert np.array_equal(prepare_stamp(rgba, StampSettings())[0], rgba[..., :3])


@pytest.mark.parametrize("raw, hint", [
    (np.zeros((4, 4, 5)), "three bands"),
    (np.zeros((0, 4)), "empty"),
    (np.array([["a", "b"], ["c", "d"]]), "must be numbers"),
])
def test_unusable_stamp_shapes_are_stamp_errors(raw, hint):
    with pytest.raises(StampError, match=hint):
        prepare_stamp(raw, StampSettings())


@hyp_settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                  elements=st.floats(allow_nan=True, allow_infinity=True, width=32)))
def test_any_float_stamp_becomes_valid_pixels_without_warnings(data):
    with no_warnings():
        pixels, flags = prepare_stamp(data, StampSettings())
    assert pixels.dtype == np.uint8 and pixels.shape == data.shape + (3,)
    assert ("nan-filled" in flags) == (not np.all(np.isfinite(data)))


# ------------------------------------------------------------------ resizing, PNG

def test_larger_stamps_shrink_keeping_aspect_and_the_source_position():
    data = RNG.normal(0, 0.1, (200, 100)) + gaussian((200, 100), 60, 40, sigma=6)
    pixels, flags = prepare_stamp(data, StampSettings(max_size=50))
    assert pixels.shape == (50, 25, 3) and flags == ("shrunk",)
    y, x = brightest(pixels)
    assert abs(y - 10) <= 1 and abs(x - 15) <= 1


def test_smaller_stamps_are_never_enlarged():
    data = RNG.normal(size=(40, 30))
    pixels, flags = prepare_stamp(data, StampSettings(max_size=336))
    assert pixels.shape == (40, 30, 3) and "shrunk" not in flags
    assert np.array_equal(pixels, prepare_stamp(data, StampSettings())[0])


@pytest.mark.parametrize("pixels", [
    RNG.integers(0, 256, size=(33, 17, 3), dtype=np.uint8),
    np.repeat(RNG.integers(0, 256, size=(20, 20, 1), dtype=np.uint8), 3, axis=2),
])
def test_png_round_trips_to_the_same_pixels(pixels):
    png = encode_png(pixels)
    assert png.startswith(b"\x89PNG")
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert np.array_equal(decoded, pixels)


def test_png_only_when_asked():
    cube = RNG.normal(size=(3, 8, 8))
    with_png = list(iter_stamps(CubeSource(cube), range(3), StampSettings(encode_png=True)))
    assert all(np.array_equal(np.asarray(Image.open(io.BytesIO(s.png)).convert("RGB")),
                              s.pixels) for s in with_png)
    assert all(s.png is None for s in iter_stamps(CubeSource(cube), range(3),
                                                  StampSettings()))


def test_encode_png_rejects_non_rgb_arrays():
    with pytest.raises(StampError, match="uint8 H x W x 3"):
        encode_png(np.zeros((4, 4), np.float32))


# ------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_keep_the_order_of_rows(workers):
    cube = RNG.normal(size=(300, 8, 8)).astype(np.float32)
    rows = RNG.permutation(300)[:250]
    serial = list(iter_stamps(CubeSource(cube), rows, StampSettings(), workers=0))
    threaded = list(iter_stamps(CubeSource(cube), rows, StampSettings(), workers=workers))
    assert [s.index for s in threaded] == list(range(250))
    assert [s.row for s in threaded] == list(rows)
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(serial, threaded))


class CountingCube(CubeSource):
    """A cube that counts the rows read from it."""

    def __init__(self, cube):
        super().__init__(cube)
        self.reads = 0

    def raw(self, row):
        self.reads += 1
        return super().raw(row)


def test_look_ahead_is_bounded_and_closing_stops_preparation():
    source = CountingCube(np.zeros((100_000, 4, 4), np.float32))
    stamps = iter_stamps(source, range(100_000), StampSettings(), workers=2)
    first = [next(stamps) for _ in range(5)]
    stamps.close()
    assert [s.row for s in first] == list(range(5))
    assert source.reads <= (look_ahead_chunks(2) + 1) * CHUNK_ROWS


def test_rows_outside_the_source_are_refused_up_front():
    with pytest.raises(StampError, match="row 7 is outside.*5 rows"):
        list(iter_stamps(CubeSource(np.zeros((5, 4, 4))), [0, 7], StampSettings()))
