"""The weight-free `color_stats` encoder: layout, meaning on known colours, determinism."""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import pytest

from atlaspatch_stream.backends.encoders import registry as reg
from atlaspatch_stream.backends.encoders.color_stats import BINS, DIM, feature_names
from tests.conftest import real_slide


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


def _torch_reference(pixels: np.ndarray) -> np.ndarray:
    """The definition: the torch module on uint8 / 255 in NCHW (what runs on CUDA tensors)."""
    import torch

    from atlaspatch_stream.backends.encoders.color_stats import build

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
        return build()(x).numpy()


def _assert_matches_definition(got: np.ndarray, pixels: np.ndarray) -> None:
    want = _torch_reference(pixels)
    np.testing.assert_array_equal(got[:, 18:], want[:, 18:])  # histograms: the same bins, pixel for pixel
    np.testing.assert_allclose(got[:, :18], want[:, :18], rtol=0, atol=2e-6)  # float32 rounding of the sums


def test_cpu_tables_equal_the_torch_definition_on_tissue_and_noise(encoder) -> None:
    """Drawn tissue patches (edges, background), uniform noise and flat colours through the encoder's CPU path
    (integer histograms and tables): histograms identical to the torch formulas, means and stds to 2e-6."""
    from atlaspatch_stream.testing.synthetic import draw_tissue

    tissue, _ = draw_tissue(448, 224, seed=2)
    rng = np.random.default_rng(3)
    batch = np.concatenate([
        np.stack([tissue[:, :224], tissue[:, 224:]]),
        rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8),
        np.broadcast_to(np.array([[[[10, 200, 30]]], [[[0, 0, 0]]], [[[255, 255, 255]]]], np.uint8), (3, 224, 224, 3)),
    ])
    _assert_matches_definition(encoder.encode(batch), batch)


def test_every_hue_bin_edge_colour_gets_the_torch_bin() -> None:
    """All ~97k colours whose hue lies exactly on a bin edge (where float32 rounding decides the bin), plus the
    grey axis and every maximum/minimum tie: laid out as patches, each gets exactly the torch formula's bins."""
    from atlaspatch_stream.backends.encoders.color_stats import _tables, cpu_color_stats

    codes = _tables().edge_codes
    grey = np.arange(256, dtype=np.int64) * 0x010101
    ties = np.array([r << 16 | r << 8 | b for r in range(0, 256, 5) for b in range(256)], dtype=np.int64)
    colours = np.concatenate([codes, grey, ties])
    colours = np.concatenate([colours, colours[: (-len(colours)) % 4096]])
    pixels = np.stack([colours >> 16 & 255, colours >> 8 & 255, colours & 255], -1).astype(np.uint8)
    patches = pixels.reshape(-1, 64, 64, 3)
    _assert_matches_definition(cpu_color_stats(patches), patches)


def test_cpu_path_takes_tensors_and_rejects_bad_input() -> None:
    """`encode_uint8` accepts a CPU torch tensor like a numpy array; a float or wrongly shaped batch is refused."""
    import torch

    from atlaspatch_stream.backends.encoders.color_stats import build, cpu_color_stats

    pixels = np.random.default_rng(4).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(build().encode_uint8(torch.from_numpy(pixels)), cpu_color_stats(pixels))
    with pytest.raises(ValueError, match="uint8"):
        cpu_color_stats(pixels.astype(np.float32))
    assert cpu_color_stats(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 90)


def _plain_definition(pixels: np.ndarray) -> np.ndarray:
    """The 90 values of the CPU definition, written plainly: each pixel's nine float values (the level / 255, the
    maximum level, saturation of the (max, min) pair by the torch formula, hue as the exact rational n6 / (6 chroma)
    rounded to float32, optical density), their mean and population std by numpy in float64 (two passes), and
    histograms of the torch formulas' bins."""
    import torch

    from atlaspatch_stream.backends.encoders.color_stats import (
        OD_MAX,
        _bin_index,
        _hsv,
        _optical_density,
        _tables,
    )

    t = _tables()
    flat = pixels.reshape(len(pixels), -1, 3).astype(np.int64)
    r, g, b = flat[..., 0], flat[..., 1], flat[..., 2]
    hi, lo = flat.max(-1), flat.min(-1)
    d = hi - lo
    n6 = np.where(r == hi, (g - b) % np.maximum(6 * d, 1), np.where(g == hi, b - r + 2 * d, r - g + 4 * d))
    hue = (n6 / np.maximum(6.0 * d, 1.0)).astype(np.float32)
    level, od = t.level[:, 0], t.od[:, 0]
    sat = t.sat_value[hi * 256 + lo]
    values = [level[r], level[g], level[b], hue, sat, level[hi], od[r], od[g], od[b]]
    rgb = torch.from_numpy(flat.transpose(0, 2, 1).astype(np.float32) / np.float32(255.0))
    hsv, density = _hsv(rgb), _optical_density(rgb)
    bins = [_bin_index(rgb[:, c], 1.0) for c in range(3)] + [_bin_index(hsv[:, c], 1.0) for c in range(3)]
    bins += [_bin_index(density[:, c], OD_MAX) for c in range(3)]
    hists = [np.stack([np.bincount(row, minlength=BINS) for row in x.numpy()]) / flat.shape[1] for x in bins]
    means = np.stack([v.astype(np.float64).mean(1) for v in values], 1)
    stds = np.stack([v.astype(np.float64).std(1) for v in values], 1)
    return np.concatenate([means, stds, *hists], axis=1).astype(np.float32)


def _assert_equals_plain_definition(got: np.ndarray, pixels: np.ndarray) -> None:
    """Histograms and means bit for bit; standard deviations within 1e-9 (they come from one pass of float64 sums,
    and a near-constant channel's sum of squares minus its squared mean loses a few float64 digits)."""
    want = _plain_definition(pixels)
    np.testing.assert_array_equal(got[:, 18:], want[:, 18:])
    np.testing.assert_array_equal(got[:, :9], want[:, :9])
    np.testing.assert_allclose(got[:, 9:18], want[:, 9:18], rtol=0, atol=1e-9)


def test_all_ninety_values_equal_the_plain_definition_on_tissue_noise_and_flat_colours() -> None:
    """Drawn tissue (two sizes, with near-grey background), uniform noise (two patch sizes) and flat colours: every
    histogram and mean bit for bit, every std to 1e-9; the same bits on one thread as on three."""
    from atlaspatch_stream.backends.encoders.color_stats import cpu_color_stats
    from atlaspatch_stream.testing.synthetic import draw_tissue

    tissue, _ = draw_tissue(480, 240, seed=5)
    background, _ = draw_tissue(224 * 8, 224 * 2, seed=3)
    rng = np.random.default_rng(11)
    flat = np.array([[[[10, 200, 30]]], [[[0, 0, 0]]], [[[255, 255, 255]]], [[[128, 64, 64]]]], np.uint8)
    for batch in (
        np.stack([tissue[:, :240], tissue[:, 240:]]),
        np.stack([background[y : y + 224, x : x + 224] for y in (0, 224) for x in range(0, 224 * 8, 224)]),
        rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8),
        rng.integers(0, 256, (2, 37, 53, 3), dtype=np.uint8),
        np.broadcast_to(flat, (4, 32, 32, 3)),
    ):
        got = cpu_color_stats(batch)
        _assert_equals_plain_definition(got, batch)
        np.testing.assert_array_equal(cpu_color_stats(batch, threads=3), got)


def test_all_ninety_values_equal_the_plain_definition_on_real_patches() -> None:
    """Patches of a real Aperio slide (CMU-1-Small-Region), read with tiffslide."""
    import tiffslide

    from atlaspatch_stream.backends.encoders.color_stats import cpu_color_stats

    with tiffslide.TiffSlide(real_slide("aperio/CMU-1-Small-Region.svs")) as slide:
        region = np.asarray(slide.read_region((0, 0), 0, (2220, 2967)).convert("RGB"))
    batch = np.stack([region[y : y + 224, x : x + 224] for y in range(0, 2800, 700) for x in range(0, 2000, 500)])
    _assert_equals_plain_definition(cpu_color_stats(batch, threads=2), batch)


def test_hue_by_division_is_the_exact_rational_for_every_key() -> None:
    """Hue per pixel is n6 / (6 chroma) divided in float32; for every (n6, chroma) it equals the rational divided in
    float64 and then rounded to float32 (the previous implementation's hue table)."""
    d = np.repeat(np.arange(1, 256), 6 * np.arange(1, 256))
    n6 = np.concatenate([np.arange(6 * k) for k in range(1, 256)])
    ours = n6.astype(np.float32) / (6 * d).astype(np.float32)
    exact = (n6 / (6.0 * d)).astype(np.float32)
    np.testing.assert_array_equal(ours, exact)


def _encode_in_child(pixels: np.ndarray, queue: Any) -> None:
    from atlaspatch_stream.backends.encoders.color_stats import cpu_color_stats

    queue.put(cpu_color_stats(pixels, threads=2))


def test_the_helper_threads_serve_a_forked_child_too() -> None:
    """The helper threads are kept per process: a child forked after a threaded batch gets its own (a fork copies
    no thread), and its batch comes back with the same bits."""
    import multiprocessing

    from atlaspatch_stream.backends.encoders.color_stats import cpu_color_stats

    pixels = np.random.default_rng(6).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    here = cpu_color_stats(pixels, threads=2)
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=_encode_in_child, args=(pixels, queue))
    child.start()
    try:
        np.testing.assert_array_equal(queue.get(timeout=120), here)
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
