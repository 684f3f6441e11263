"""Metadata rules (upstream §7.2) with our two improvements: CSV decides mpp and magnification; implausible
optional tags are skipped instead of failing the slide."""

from __future__ import annotations

import pytest

from atlaspatch_stream.backends.metadata import (
    magnification_from_mpp,
    metadata_mpp,
    mpp_candidates,
    normalize_properties,
    objective_power,
    resolve_metadata,
)


def test_lookup_order_prefers_openslide_mpp_then_vendor_keys_then_text_then_resolution_then_magnification() -> (
    None
):
    """Given every kind of source, candidates come in upstream's order and the first plausible one wins."""
    props = {
        "openslide.mpp-x": "0.2525",
        "aperio.MPP": "0.5",
        "tiff.ImageDescription": "Aperio |MPP = 0.3|AppMag = 40",
        "tiff.XResolution": "40000",
        "tiff.ResolutionUnit": "centimeter",
        "aperio.AppMag": "20",
    }
    sources = [source for source, _ in mpp_candidates(props)]
    assert sources == [
        "openslide.mpp-x",
        "aperio.MPP",
        "tiff.ImageDescription",
        "tiff.XResolution",
        "aperio.AppMag",
    ]
    assert metadata_mpp(props) == (0.2525, "openslide.mpp-x")
    del props["openslide.mpp-x"], props["aperio.MPP"]
    assert metadata_mpp(props) == (0.3, "tiff.ImageDescription")
    del props["tiff.ImageDescription"]
    assert metadata_mpp(props) == (0.25, "tiff.XResolution")  # 10000 / 40000 cm⁻¹
    del props["tiff.XResolution"]
    assert metadata_mpp(props) == (0.5, "aperio.AppMag")  # 10 / 20


def test_text_patterns_and_units() -> None:
    """'microns per pixel' text and inch resolution units are understood; values are rounded to 4 dp."""
    assert metadata_mpp({"openslide.comment": "Microns per pixel: 0.123456"}) == (0.1235, "openslide.comment")
    assert metadata_mpp({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "INCH"}) == (
        0.5,
        "tiff.XResolution",
    )


def test_72_dpi_resolution_is_skipped_and_objective_power_keeps_the_slide() -> None:
    """A 72-dpi TIFF (352.8 µm/px) with objective power: upstream fails it; we skip the tag and keep 40×."""
    props = {"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch", "openslide.objective-power": "40"}
    meta = resolve_metadata(props)
    assert meta.magnification == 40
    assert meta.mpp == 0.25  # the next source in the order: 10 / objective power
    assert meta.mpp_source == "openslide.objective-power"


def test_implausible_only_gives_unknown_mpp_and_magnification() -> None:
    """Only an implausible mpp and no objective power: mpp and magnification are unknown, not an error."""
    meta = resolve_metadata({"openslide.mpp-x": "352.8"})
    assert (meta.mpp, meta.magnification, meta.mpp_source) == (None, None, None)
    assert resolve_metadata({"openslide.mpp-x": "0.05"}).mpp is None


@pytest.mark.parametrize(
    ("mpp", "mag"),
    [
        (0.1, 80),
        (0.159, 80),
        (0.16, 60),
        (0.2, 40),
        (0.25, 40),
        (0.3, 20),
        (0.5, 20),
        (0.6, 10),
        (1.19, 10),
        (1.2, 5),
        (2.39, 5),
        (2.4, None),
        (9.0, None),
        (None, None),
    ],
)
def test_magnification_buckets(mpp: float | None, mag: int | None) -> None:
    """Upstream's buckets, bounds exclusive."""
    assert magnification_from_mpp(mpp) == mag


def test_objective_power_wins_over_buckets_without_csv() -> None:
    """A 0.5-mpp slide tagged 40×: without CSV the tag decides (as upstream)."""
    meta = resolve_metadata({"openslide.mpp-x": "0.5", "openslide.objective-power": "40.0"})
    assert (meta.mpp, meta.magnification) == (0.5, 40)
    assert objective_power({"openslide.objective-power": "0"}) is None
    assert objective_power({"openslide.objective-power": "n/a"}) is None


def test_csv_overrides_mpp_and_magnification() -> None:
    """With a CSV mpp of 0.5 the slide is 20×, whatever its objective-power tag says (our improvement)."""
    meta = resolve_metadata({"openslide.mpp-x": "0.25", "openslide.objective-power": "40"}, mpp_override=0.5)
    assert (meta.mpp, meta.magnification, meta.mpp_source) == (0.5, 20, "mpp-csv")
    assert resolve_metadata({}, mpp_override=0.123456).mpp == 0.1235


def test_csv_value_outside_range_is_an_error() -> None:
    """A CSV mpp outside [0.1, 10] is refused, as upstream (the user asked for it explicitly)."""
    with pytest.raises(ValueError, match="outside the plausible range"):
        resolve_metadata({}, mpp_override=25.0)


def test_normalize_maps_tiffslide_keys_and_drops_empty_values() -> None:
    """tiffslide's keys become OpenSlide's; None and blank values vanish; numbers become strings."""
    props = normalize_properties(
        {"tiffslide.mpp-x": 0.499, "tiffslide.vendor": None, "aperio.AppMag": 20, "x": " "}
    )
    assert props == {"openslide.mpp-x": "0.499", "aperio.AppMag": "20"}


def test_vendor_institution_stain_lookup() -> None:
    """Listed keys first (case-insensitive), then any key containing the token; empty values skipped."""
    props = {
        "Tiff.Make": "Acme",
        "openslide.vendor": "",
        "dicom.InstitutionName": "Bangor",
        "custom.stainname": "H&E",
    }
    meta = resolve_metadata(props)
    assert (meta.vendor, meta.institution, meta.stain) == ("Acme", "Bangor", "H&E")
    assert resolve_metadata({}).vendor is None
