"""Write atlaspatch_stream/backends/decoders/probe_tiles.npz: the decoders' start-up probe tiles and references.

    python scripts/make_probe_tiles.py

One 64×64 H&E-coloured tile per codec family a GPU backend may take (Aperio RGB JPEG without markers, YCbCr JPEG
4:2:0, JPEG 2000 as Aperio 33005 stores it), encoded with imagecodecs, and each one's decode by the `cpu` reference
decoder. Shipping them keeps the probes free of encoders at run time (and of imagecodecs on a bare GPU machine);
tests/unit/test_decoders.py checks that the stored references still equal the `cpu` decoder's output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atlaspatch_stream.backends.decoders.cpu import CpuDecoder
from atlaspatch_stream.backends.decoders.probe import PROBE_FILE, encode_probe_tiles, probe_meta


def main() -> None:
    """Encode the probe tiles, decode them with the reference, save both."""
    arrays: dict[str, np.ndarray] = {}
    for codec, raw in encode_probe_tiles().items():
        arrays[f"{codec}_bytes"] = np.frombuffer(raw, np.uint8)
        arrays[f"{codec}_pixels"] = CpuDecoder().decode_batch([raw], probe_meta(codec)).pixels[0]
    np.savez_compressed(PROBE_FILE, **arrays)
    print(f"wrote {Path(PROBE_FILE)} ({Path(PROBE_FILE).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
