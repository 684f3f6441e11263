"""`python -m atlaspatch_stream.testing FOLDER`: write the sample slide (FOLDER/sample.svs) used by the README."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """Write `sample.svs` (40×, 0.25 µm/px, drawn tissue) into the folder given as the only argument."""
    if len(argv) != 1:
        print("usage: python -m atlaspatch_stream.testing FOLDER", file=sys.stderr)
        return 2
    from .synthetic import write_sample_slide

    folder = Path(argv[0])
    folder.mkdir(parents=True, exist_ok=True)
    print(write_sample_slide(folder / "sample.svs"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
