"""What goes into every output file besides pixels: root attributes in upstream's order and passport strings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

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
        pairs: list[tuple[str, Any]] = [
            ("patch_size", int(self.patch_size)),
            ("patch_size_level0", int(self.patch_size_level0)),
            ("level0_magnification", int(self.level0_magnification)),
            ("target_magnification", int(self.target_magnification)),
            ("overlap", int(self.overlap)),
            ("level0_width", int(self.level0_width)),
            ("level0_height", int(self.level0_height)),
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


