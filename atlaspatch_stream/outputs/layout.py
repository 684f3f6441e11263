"""Outputs: where each slide's files go (upstream §2.1), their root attributes and passports, and reuse rules (§2.6).

Better than upstream on purpose: a reused file must match the requested geometry, or the slide fails with a message
suggesting `--force`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..items import ReuseDecision, SourceRecord

PASSPORT_FORMAT = "{stem}__x{X}_y{Y}_rw{RW}_rh{RH}_lv{LV}_mag{MAG}_tmag{TMAG}_total{N}"
PASSPORT_VERSION = 2
PASSPORT_DTYPE = "S160"


@dataclass(frozen=True)
class SlideAttrs:
    """The root attributes of one slide's H5, in upstream's order, plus ours (new names only)."""

    patch_size: int
    patch_size_level0: int
    level0_magnification: int
    target_magnification: int
    overlap: int
    level0_width: int
    level0_height: int
    wsi_path: str
    filename: str
    mpp: float | None = None
    magnification: int | None = None
    vendor: str | None = None
    institution: str | None = None
    stain: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def ordered(self) -> list[tuple[str, Any]]:
        """(name, value) pairs in upstream's writing order; optional ones only when known."""
        integers = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                    "level0_width", "level0_height")
        pairs: list[tuple[str, Any]] = [(k, int(getattr(self, k))) for k in integers]
        pairs += [
            ("wsi_path", str(self.wsi_path)),
            ("passport_format", PASSPORT_FORMAT),
            ("passport_version", PASSPORT_VERSION),
            ("creation_date", datetime.now(timezone.utc).isoformat()),
            ("filename", str(self.filename)),
        ]
        optional = [
            ("mpp", None if self.mpp is None else float(self.mpp)),
            ("magnification", None if self.magnification is None else int(self.magnification)),
            ("vendor", self.vendor),
            ("institution", self.institution),
            ("stain", self.stain),
        ]
        pairs += [(k, v) for k, v in optional if v not in (None, "")]
        # Additions never overwrite upstream's attributes (the settings record repeats patch_size etc.).
        upstream = {k for k, _ in pairs} | {"num_patches"}
        pairs += [(k, v) for k, v in self.extra.items() if v is not None and k not in upstream]
        return pairs


def h5_path(output: Path, stem: str) -> Path:
    """`<out>/patches/<stem>.h5`."""
    return output / "patches" / f"{stem}.h5"


def lock_path(output: Path, stem: str) -> Path:
    """`<out>/patches/<stem>.lock` (one path for both phases, as upstream)."""
    return output / "patches" / f"{stem}.lock"


def images_dir(output: Path, stem: str) -> Path:
    """`<out>/images/<stem>/`."""
    return output / "images" / stem


def qc_thumbs_dir(output: Path) -> Path:
    """`<out>/qc/thumbs/` (`--qc`: `<stem>.jpg` and `<stem>.mask.png`)."""
    return output / "qc" / "thumbs"


def visualization_dir(output: Path) -> Path:
    """`<out>/visualization/`."""
    return output / "visualization"


def source_record(attrs: Mapping[str, Any]) -> SourceRecord:
    """What an output's root attributes say it was made from: `filename`, `level0_width` and `level0_height` (each
    may be missing in files of other tools)."""
    width, height = attrs.get("level0_width"), attrs.get("level0_height")
    level0 = (int(width), int(height)) if width is not None and height is not None else None
    name = attrs.get("filename")
    return SourceRecord(str(name) if name is not None else None, level0)


GEOMETRY_KEYS = ("patch_size", "target_magnification", "overlap")


def geometry_mismatch(attrs: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Settings of an existing file that differ from the request (our fingerprint first, upstream's attributes else)."""
    theirs = attrs.get("settings_fingerprint")
    if theirs is not None and theirs == wanted.get("settings_fingerprint"):
        return []
    keys = [k for k in (*GEOMETRY_KEYS, "step_size", "tissue_thresh", "fast_mode", "segmenter") if k in attrs]
    diffs = [f"{k}={attrs[k]!r} (requested {wanted[k]!r})" for k in keys if k in wanted and attrs[k] != wanted[k]]
    if not diffs and theirs is not None:
        # The fingerprint also covers settings without their own attribute (filter thresholds, segmenter weights):
        # a differing fingerprint is a mismatch even when no named attribute differs.
        if attrs.get("segmenter_sha256") != wanted.get("segmenter_sha256"):
            diffs.append("segmenter weights differ")
        else:
            diffs.append(f"settings fingerprint {theirs} (requested {wanted.get('settings_fingerprint')})")
    return diffs


def decide_reuse(existing: Any | None, encoders: Sequence[str], wanted: Mapping[str, Any]) -> ReuseDecision:
    """Upstream's reuse rules (§2.6) plus a geometry check.

    Args:
        existing: an `ExistingH5` (from the store) or None when the file is absent or unreadable.
        encoders: requested encoder names (empty for `segment-and-get-coords`).
        wanted: the attributes this run would write (for the geometry check).
    """
    if existing is None:
        return ReuseDecision("new")
    source = source_record(existing.attrs)
    diffs = geometry_mismatch(existing.attrs, wanted)
    if diffs:
        return ReuseDecision("mismatch", reason="; ".join(diffs), source=source)
    if not encoders:
        return ReuseDecision("skip", num_patches=existing.num_patches or 0, reason="output exists", source=source)
    num = existing.num_patches
    if num is None or (num <= 0 and "settings_fingerprint" not in existing.attrs):
        return ReuseDecision("new", reason="existing output has no patches")
    missing = tuple(e for e in encoders if existing.features.get(e.lower()) != num)
    if not missing:
        return ReuseDecision("skip", num_patches=num, reason="all features present", source=source)
    return ReuseDecision("reuse", num_patches=num, missing=missing, source=source)
