"""`import atlaspatch_stream`, the API, the CLI and `atlaspatch --help` load no heavy library (checked in a subprocess)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "cv2", "h5py", "timm", "sam2", "tiffslide", "openslide", "torchvision", "numba")

CHECK = """
import sys
{imports}
heavy = [m for m in {heavy!r} if m in sys.modules]
print("HEAVY:" + ",".join(heavy))
"""


def _loaded(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY:")][-1]
    return [m for m in line[len("HEAVY:"):].split(",") if m]


@pytest.mark.parametrize("module", ["atlaspatch_stream", "atlaspatch_stream.api", "atlaspatch_stream.cli",
                                    "atlaspatch_stream.sync", "atlaspatch_stream.pipeline"])
def test_import_is_light(module: str) -> None:
    """Importing the module (and touching the lazy public names) loads none of torch, cv2, h5py, ..."""
    imports = f"import {module}\nimport atlaspatch_stream as ap\nap.PipelineConfig, ap.process_slides, ap.SlideError"
    assert _loaded(CHECK.format(imports=imports, heavy=HEAVY)) == []


def test_cli_help_is_light() -> None:
    """`atlaspatch --help` (the console entry point's main) prints help and loads no heavy library."""
    code = CHECK.format(heavy=HEAVY, imports=(
        "sys.argv = ['atlaspatch', '--help']\n"
        "from atlaspatch_stream.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
    ))
    assert _loaded(code) == []


def test_console_script_help_runs() -> None:
    """The installed `atlaspatch` script answers --help with exit status 0."""
    script = shutil.which("atlaspatch") or str(Path(sys.executable).with_name("atlaspatch"))
    if not Path(script).exists():
        pytest.skip("atlaspatch console script not installed")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "process" in out.stdout
