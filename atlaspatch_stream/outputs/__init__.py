"""Everything under `<out>`: where each file goes and what it records (`layout`), claims and locks (`claims`), the
H5 store on its one thread (`h5store`, `h5io`, `h5thread`), patch PNGs (`images`) and the `OutputStore` the
pipeline writes through (`h5outputs`).

Only `layout`'s pure names are imported here; h5py and cv2 load with the modules that need them.
"""

from .layout import (
    GEOMETRY_KEYS,
    PASSPORT_DTYPE,
    PASSPORT_FORMAT,
    PASSPORT_VERSION,
    ReuseDecision,
    SlideAttrs,
    SourceRecord,
    decide_reuse,
    geometry_mismatch,
    h5_path,
    images_dir,
    lock_path,
    qc_thumbs_dir,
    visualization_dir,
)

__all__ = [
    "GEOMETRY_KEYS", "PASSPORT_DTYPE", "PASSPORT_FORMAT", "PASSPORT_VERSION", "ReuseDecision", "SlideAttrs",
    "SourceRecord", "decide_reuse", "geometry_mismatch", "h5_path", "images_dir", "lock_path", "qc_thumbs_dir",
    "visualization_dir",
]
