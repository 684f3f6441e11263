"""The weight-free `color_stats` encoder: layout, meaning on known colours, determinism."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from atlaspatch_stream.backends.encoders import registry as reg
from atlaspatch_stream.backends.encoders.color_stats import BINS, DIM, feature_names


@pytest.fixture(scope="module")
def encoder():
    """color_stats created through the registry, as the pipeline does."""
    enc = reg.build_registry(device="cpu", precision="float32", weights={}, plugins=(), num_workers=0).create(
        "color_stats"
    )
    yield enc
    enc.close()


def _uniform(rgb: tuple[int, int, int], size: int = 16) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (1, size, size, 3)).copy()


def _columns(values: np.ndarray) -> dict[str, float]:
    return dict(zip(feature_names(), values.tolist(), strict=True))


def test_layout_has_ninety_named_columns(encoder) -> None:
    """90 values: 9 means, 9 stds, 72 histogram bins; the names match the documented order."""
    names = feature_names()
    assert DIM == 90 == len(names) == len(set(names)) == encoder.dim
    assert names[:3] == ["rgb_r_mean", "rgb_g_mean", "rgb_b_mean"]
    assert names[9] == "rgb_r_std" and names[18] == "rgb_r_hist0" and names[66] == "od_od_r_hist0"


def test_uniform_red_patch_means_what_it_says(encoder) -> None:
    """Pure red: RGB mean (1,0,0), no spread, hue 0 / saturation 1 / value 1, OD 0 in red and log10(256) in G and B,
    and every histogram puts all pixels in the expected bin."""
    c = _columns(encoder.encode(_uniform((255, 0, 0)))[0])
    assert (c["rgb_r_mean"], c["rgb_g_mean"], c["rgb_b_mean"]) == pytest.approx((1, 0, 0), abs=1e-6)
    assert all(c[n] == pytest.approx(0, abs=1e-6) for n in feature_names() if n.endswith("_std"))
    assert (c["hsv_h_mean"], c["hsv_s_mean"], c["hsv_v_mean"]) == pytest.approx((0, 1, 1), abs=1e-6)
    assert c["od_od_r_mean"] == pytest.approx(0, abs=1e-6)
    assert c["od_od_g_mean"] == pytest.approx(np.log10(256), abs=1e-5)
    assert c[f"rgb_r_hist{BINS - 1}"] == 1 and c["rgb_g_hist0"] == 1 and c["hsv_s_hist7"] == 1
    assert c["od_od_r_hist0"] == 1 and c["od_od_g_hist7"] == 1


def test_white_patch_has_no_saturation_and_no_density(encoder) -> None:
    """White background: saturation 0, hue 0 by convention, optical density 0."""
    c = _columns(encoder.encode(_uniform((255, 255, 255)))[0])
    assert c["hsv_s_mean"] == pytest.approx(0, abs=1e-6) and c["hsv_h_mean"] == pytest.approx(0, abs=1e-6)
    assert max(c["od_od_r_mean"], c["od_od_g_mean"], c["od_od_b_mean"]) == pytest.approx(0, abs=1e-6)


def test_hsv_means_agree_with_colorsys_and_histograms_sum_to_one(encoder) -> None:
    """Random pixels: HSV means equal Python's colorsys; RGB mean/std equal numpy's; each histogram sums to 1."""
    rng = np.random.default_rng(7)
    patch = rng.integers(0, 256, (1, 12, 12, 3), dtype=np.uint8)
    out = encoder.encode(patch)[0]
    c = _columns(out)
    pixels = patch.reshape(-1, 3) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    assert (c["hsv_h_mean"], c["hsv_s_mean"], c["hsv_v_mean"]) == pytest.approx(tuple(hsv.mean(0)), abs=1e-5)
    assert (c["rgb_r_std"], c["rgb_g_std"], c["rgb_b_std"]) == pytest.approx(tuple(pixels.std(0)), abs=1e-5)
    hists = out[18:].reshape(9, BINS)
    np.testing.assert_allclose(hists.sum(1), 1.0, atol=1e-6)


def test_deterministic_and_batch_independent(encoder) -> None:
    """Same input, same bits; a patch's features do not depend on its batch neighbours."""
    rng = np.random.default_rng(8)
    batch = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    first, second = encoder.encode(batch), encoder.encode(batch)
    assert first.dtype == np.float32 and first.shape == (3, 90)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(encoder.encode(batch[1:2])[0], first[1], atol=1e-6)
