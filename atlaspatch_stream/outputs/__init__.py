"""Everything under `<out>`: where each file goes and what it records (`layout`), claims and locks (`claims`), the
H5 store on its one thread (`h5store`, `h5io`, `h5thread`), patch PNGs (`images`), overlay and QC images
(`overlays`) and the `OutputStore` the pipeline writes through (`h5outputs`).

Only `layout`'s pure names are imported here; h5py and cv2 load with the modules that need them.
"""

from .layout import (
    PASSPORT_DTYPE,
    PASSPORT_FORMAT,
    SlideAttrs,
    decide_reuse,
    h5_path,
    images_dir,
    lock_path,
    qc_thumbs_dir,
    visualization_dir,
)

__all__ = [
    "PASSPORT_DTYPE", "PASSPORT_FORMAT", "SlideAttrs", "decide_reuse", "h5_path", "images_dir", "lock_path",
    "qc_thumbs_dir", "visualization_dir",
]
