"""Pure metadata rules (upstream §7.2): mpp lookup order, validation, magnification buckets, descriptive keys.

No I/O and no third-party imports: every rule works on a plain `{key: str}` property mapping with OpenSlide key
names. `normalize_properties` turns tiffslide's and OpenSlide's property dicts into that shape.

Two deliberate improvements over upstream (README "Differences"):

- An mpp given by `--mpp-csv` wins over slide metadata for the mpp *and* for the magnification derived from it
  (upstream keeps the objective-power tag even when the CSV says otherwise).
- An implausible mpp candidate from optional metadata (e.g. a 72-dpi TIFF resolution: 352.8 µm/px) is skipped and the
  lookup goes on, instead of failing the slide. A slide whose objective power is known therefore never fails on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

MPP_MIN = 0.1
MPP_MAX = 10.0


# Upstream step 2: the first parseable key wins (`hamamatsu.XResolution` is kept for parity, though its unit is odd).
_MPP_KEYS = (
    "openslide.mpp-x",
    "openslide.mpp-y",
    "openslide.mirax.MPP",
    "aperio.MPP",
    "hamamatsu.XResolution",
)
_TEXT_KEYS = ("openslide.comment", "tiff.ImageDescription")
_MAG_KEYS = ("aperio.AppMag", "openslide.objective-power", "hamamatsu.SourceLens")
_MPP_PATTERNS = (
    re.compile(r"\bmpp\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", re.IGNORECASE),
    re.compile(r"microns?\s*per\s*pixel\D*?([0-9]*\.?[0-9]+)", re.IGNORECASE),
)
_UNIT_MICRONS = {"centimeter": 10000.0, "cm": 10000.0, "inch": 25400.0}

# (upper bound exclusive, magnification): upstream `_infer_mag`.
_MAG_BUCKETS = ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5))

VENDOR_KEYS = ("openslide.vendor", "tiff.make", "tiff.model", "hamamatsu.model", "leica.scanner")
INSTITUTION_KEYS = (
    "tiff.institution",
    "tiff.institutionname",
    "aperio.institution",
    "openslide.institution",
    "dicom.institutionname",
)
STAIN_KEYS = (
    "aperio.stain",
    "aperio.staindescription",
    "openslide.stain",
    "hamamatsu.stain",
    "philips.stain",
)


@dataclass(frozen=True)
class ResolvedMetadata:
    """The outcome of the metadata rules for one slide."""

    mpp: float | None
    magnification: int | None
    mpp_source: str | None
    vendor: str | None = None
    institution: str | None = None
    stain: str | None = None


def normalize_properties(properties: Mapping[str, object]) -> dict[str, str]:
    """Properties as `{key: str}` with OpenSlide names; `tiffslide.x` becomes `openslide.x`, empty values dropped.

    Args:
        properties: a tiffslide or OpenSlide property mapping (values of any type, None allowed).
    """
    out: dict[str, str] = {}
    for key, value in properties.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        name = "openslide." + key[len("tiffslide.") :] if key.startswith("tiffslide.") else key
        out[name] = str(value)
    return out


def parse_float(text: object) -> float | None:
    """A finite float from `text`, or None."""
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def is_plausible_mpp(mpp: float) -> bool:
    """True when `mpp` (µm/px, rounded to 4 dp) lies in upstream's [0.1, 10] range."""
    return MPP_MIN <= round(mpp, 4) <= MPP_MAX


def mpp_candidates(properties: Mapping[str, str]) -> Iterator[tuple[str, float]]:
    """Every mpp the metadata offers, in upstream's lookup order, as (source key, µm/px), unrounded.

    Order: OpenSlide/vendor mpp keys; "mpp = x" / "microns per pixel x" in the comment or ImageDescription;
    `tiff.XResolution` with its unit; 10 / magnification from AppMag, objective power or SourceLens.
    """
    for key in _MPP_KEYS:
        value = parse_float(properties.get(key))
        if value is not None and value > 0:
            yield key, value
    for key in _TEXT_KEYS:
        for pattern in _MPP_PATTERNS:
            match = pattern.search(properties.get(key, ""))
            value = parse_float(match.group(1)) if match else None
            if value is not None and value > 0:
                yield key, value
    unit = properties.get("tiff.ResolutionUnit", "").strip().lower()
    value = parse_float(properties.get("tiff.XResolution"))
    if unit in _UNIT_MICRONS and value is not None and value > 0:
        yield "tiff.XResolution", _UNIT_MICRONS[unit] / value
    for key in _MAG_KEYS:
        value = parse_float(properties.get(key))
        if value is not None and value > 0:
            yield key, 10.0 / value


def metadata_mpp(properties: Mapping[str, str]) -> tuple[float | None, str | None]:
    """The first plausible mpp from metadata (rounded to 4 dp) and its source key; (None, None) when none is.

    Upstream stops at the first candidate and fails the slide when it is implausible; we skip it (module doc).
    """
    for source, value in mpp_candidates(properties):
        if is_plausible_mpp(value):
            return round(value, 4), source
    return None, None


def objective_power(properties: Mapping[str, str]) -> int | None:
    """`int(float(openslide.objective-power))`, or None when absent, unparseable or not positive."""
    value = parse_float(properties.get("openslide.objective-power"))
    if value is None or int(value) <= 0:
        return None
    return int(value)


def magnification_from_mpp(mpp: float | None) -> int | None:
    """Upstream's mpp buckets: <0.16 → 80, <0.2 → 60, <0.3 → 40, <0.6 → 20, <1.2 → 10, <2.4 → 5, else None."""
    if mpp is None:
        return None
    for bound, magnification in _MAG_BUCKETS:
        if mpp < bound:
            return magnification
    return None


def validate_override(mpp: float) -> float:
    """An mpp given by the user, rounded to 4 dp; ValueError when outside [0.1, 10] (as upstream)."""
    if not math.isfinite(mpp) or not is_plausible_mpp(mpp):
        raise ValueError(
            f"mpp {mpp} from --mpp-csv is outside the plausible range [{MPP_MIN}, {MPP_MAX}] µm/px"
        )
    return round(mpp, 4)


def find_attr(properties: Mapping[str, str], keys: tuple[str, ...], token: str) -> str | None:
    """First non-empty value among `keys` (case-insensitive), else of any key containing `token`; None if none."""
    lowered = {k.lower(): v for k, v in properties.items() if v and v.strip()}
    for key in keys:
        if key.lower() in lowered:
            return lowered[key.lower()].strip()
    for key, value in lowered.items():
        if token in key:
            return value.strip()
    return None


def resolve_metadata(properties: Mapping[str, str], mpp_override: float | None = None) -> ResolvedMetadata:
    """Apply the metadata rules to normalised properties.

    Args:
        properties: `normalize_properties` output.
        mpp_override: the `--mpp-csv` value for this slide; it decides mpp and magnification.

    Raises:
        ValueError: when `mpp_override` is outside [0.1, 10].
    """
    mpp: float | None
    source: str | None
    if mpp_override is not None:
        mpp, source = validate_override(mpp_override), "mpp-csv"
        magnification = magnification_from_mpp(mpp)
    else:
        mpp, source = metadata_mpp(properties)
        magnification = objective_power(properties) or magnification_from_mpp(mpp)
    return ResolvedMetadata(
        mpp=mpp,
        magnification=magnification,
        mpp_source=source,
        vendor=find_attr(properties, VENDOR_KEYS, "vendor"),
        institution=find_attr(properties, INSTITUTION_KEYS, "institution"),
        stain=find_attr(properties, STAIN_KEYS, "stain"),
    )
