"""Public test helpers: a synthetic slide writer (tiled pyramidal SVS-like TIFFs, flat images) with drawn tissue.

Importing this package needs only numpy; tifffile, imagecodecs and Pillow are imported when a file is written.
"""

from .synthetic import draw_tissue, pyramid, write_image, write_sample_slide, write_synthetic_slide

__all__ = ["draw_tissue", "pyramid", "write_image", "write_sample_slide", "write_synthetic_slide"]
