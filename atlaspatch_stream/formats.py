"""Slide file formats by extension: a pure table shared by the readers, the job sources, the daemon and the CLI.

No I/O and no imports: sources and the daemon recognise slides without importing a backend.
"""

from __future__ import annotations

TIFF_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"})
OPENSLIDE_EXTENSIONS = frozenset({".mrxs", ".vms", ".vmu", ".biff", ".dcm", ".dicom"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"})
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
SUPPORTED_EXTENSIONS = TIFF_EXTENSIONS | OPENSLIDE_EXTENSIONS | IMAGE_EXTENSIONS
