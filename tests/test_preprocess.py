
import numpy as np
import pytest

from autoseg.io.images import Geometry
from autoseg.preprocessing.preprocess import (
    axis_orders,
    foreground_locations,
    normalize,
    preprocess_case,
    restore_labels,
    restore_probabilities,
)
from autoseg.preprocessing.resample import resample_array, resample_labels

RULES = {"image_order": 3, "label_order": 1, "out_of_plane_order": 0, "anisotropy_threshold": 3.0}
NORM = [{"channel": 0, "scheme": "ct", "clip": [-100.0, 200.0], "mean": 50.0, "std": 25.0}]
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # rotated and flipped, still orthonormal


def config(spacing):
    return {"spacing": list(spacing), "resampling": RULES}


def sphere_case(shape=(20, 40, 44), spacing_zyx=(3.0, 0.8, 0.8), border=3):
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    sz, sy, sx = spacing_zyx
    r = np.sqrt(((z - shape[0] / 2) * sz) ** 2 + ((y - shape[1] / 2) * sy) ** 2 + ((x - shape[2] / 2) * sx) ** 2)
    seg = (r < 12).astype(np.uint8) + (r < 5).astype(np.uint8)
    data = np.where(seg > 0, 80.0, -50.0).astype(np.float32)[None]
    data[:, :border] = 0  # zero border: cropped away
    seg[:border] = 0
    geo = Geometry(tuple(reversed(spacing_zyx)), (12.5, -40.25, 7.0), DIRECTION, shape)
    return data, seg, geo


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_axis_orders_anisotropic_case_and_target():
    assert axis_orders([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], 3, RULES) == [3, 3, 3]
    assert axis_orders([5.0, 0.8, 0.8], [1.0, 0.8, 0.8], 3, RULES) == [0, 3, 3]  # the case is thick-slice
    assert axis_orders([1.0, 1.0, 1.0], [4.0, 1.0, 1.0], 1, RULES) == [0, 1, 1]  # the target is
    assert axis_orders([0.8, 0.8, 2.0], [1.0, 1.0, 1.0], 1, RULES) == [1, 1, 1]  # 2.5x: below threshold


def test_resample_identity_and_linear_exactness():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    assert np.array_equal(resample_array(x, (5, 6, 7), (3, 3, 3)), x)
    ramp = np.broadcast_to(np.arange(16, dtype=np.float32)[:, None, None], (16, 4, 4))[None].copy()
    up = resample_array(ramp, (32, 4, 4), (3, 1, 1))
    assert up.dtype == np.float32 and up.shape == (1, 32, 4, 4)
    # cubic convolution reproduces a linear ramp exactly away from the replicated borders
    expected = (np.arange(32) + 0.5) / 2 - 0.5
    np.testing.assert_allclose(up[0, 4:-4, 0, 0], expected[4:-4], atol=1e-5)
    np.testing.assert_allclose(resample_array(np.full((1, 4, 4, 4), 7.0, np.float32), (9, 3, 5), (3, 1, 0)), 7.0)
    with pytest.raises(ValueError, match="order"):
        resample_array(x, (6, 6, 7), (2, 3, 3))


def test_resample_labels_keeps_values_and_volume():
    _, seg, _ = sphere_case(spacing_zyx=(1.0, 1.0, 1.0), shape=(30, 30, 30))
    up = resample_labels(seg, (60, 60, 60), (1, 1, 1))
    assert set(np.unique(up)) == {0, 1, 2} and up.dtype == np.uint8
    for v in (1, 2):
        assert (up == v).sum() / 8 == pytest.approx((seg == v).sum(), rel=0.1)
    back = resample_labels(up, (30, 30, 30), (1, 1, 1))
    assert dice(back > 0, seg > 0) > 0.97


def test_normalize_ct_and_zscore():
    d = np.array([[[[-1000.0, 50.0, 75.0, 1000.0]]]], np.float32)
    out = normalize(d.copy(), NORM)
    np.testing.assert_allclose(out.ravel(), [(-100 - 50) / 25, 0.0, 1.0, (200 - 50) / 25])
    z = normalize(np.array([[[[1.0, 2.0, 3.0, 4.0]]]], np.float32), [{"channel": 0, "scheme": "zscore"}])
    assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1.0, abs=1e-5)


def test_round_trip_exact_without_resampling():
    data, seg, geo = sphere_case(spacing_zyx=(1.0, 1.0, 1.0))
    out, pseg, props = preprocess_case(data, seg, geo, config((1.0, 1.0, 1.0)), NORM)
    assert props["crop_box"][0] == [3, 20] and out.shape[1:] == pseg.shape == (17, 40, 44)
    back, bgeo = restore_labels(pseg, props)
    assert bgeo == geo  # spacing, origin, direction, shape: exact
    assert np.array_equal(back, seg)


def test_round_trip_with_anisotropic_resampling():
    data, seg, geo = sphere_case(spacing_zyx=(3.0, 0.8, 0.8))
    out, pseg, props = preprocess_case(data, seg, geo, config((1.5, 1.2, 1.2)), NORM)
    assert props["label_orders"] == [0, 1, 1]
    assert out.dtype == np.float32 and out.shape[1:] == tuple(props["shape_after_resample"])
    assert props["shape_after_resample"] == [34, 27, 29]
    back, bgeo = restore_labels(pseg, props)
    assert bgeo == geo and back.shape == seg.shape
    assert dice(back == 1, seg == 1) > 0.9 and dice(back > 0, seg > 0) > 0.95
    probs = np.stack([(pseg == v).astype(np.float32) for v in range(3)])
    pback, _ = restore_probabilities(probs, props)
    assert pback.shape == (3,) + seg.shape
    np.testing.assert_allclose(pback.sum(0), 1.0, atol=1e-5)
    assert dice(pback.argmax(0) > 0, seg > 0) > 0.95


def test_nan_is_rejected():
    data, seg, geo = sphere_case()
    data[0, 5, 5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        preprocess_case(data, seg, geo, config((1.0, 1.0, 1.0)), NORM)


def test_foreground_locations_bounded_and_correct():
    _, seg, _ = sphere_case(spacing_zyx=(1.0, 1.0, 1.0))
    fg = foreground_locations(seg, "x", max_per_class=50)
    assert set(fg) == {"class_1", "class_2", "component_1", "component_2"}
    for v in (1, 2):
        coords = fg[f"class_{v}"]
        assert coords.dtype == np.uint16 and coords.shape[1] == 3
        assert len(coords) == min(50, int((seg == v).sum()))  # one component each: the whole budget
        assert np.all(seg[tuple(coords.T)] == v)
        assert fg[f"component_{v}"].tolist() == [1] * len(coords)
    assert all(np.array_equal(fg[k], foreground_locations(seg, "x", 50)[k]) for k in fg)


@pytest.mark.parametrize("border", [0, 3])  # nothing to crop, or a crop
def test_preprocess_case_leaves_its_input_unchanged(border):
    data, seg, geo = sphere_case(spacing_zyx=(1.0, 1.0, 1.0), border=border)
    data = data.astype(np.float32)
    kept = data.copy()
    preprocess_case(data, seg, geo, config((1.0, 1.0, 1.0)), NORM)
    np.testing.assert_array_equal(data, kept)  # a cascade preprocesses one image for both stages
