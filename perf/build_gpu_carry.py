"""Build what `perf/gpu_check.py` needs on the GPU machine and cannot find there: wheels and data (gpu.md §5.1).

    python perf/build_gpu_carry.py            (from the repository root, in the project's venv)

The GPU machine has Python 3.12, torch 2.11, torchvision, timm, h5py, anyio, opencv, tifffile and Pillow, and no
network. It lacks nvImageCodec (+ nvJPEG, nvJPEG2000), orjson (imported by the package's config) and sam2 with its
pure-Python dependencies. One transfer carries at most 64 MiB, working tree included, so:

- `.whl/`: nvidia-nvimgcodec-cu13 0.9.0.20, nvidia-nvjpeg 13.0.* (matches the device's CUDA 13.0 driver),
  nvidia-nvjpeg2k-cu13 0.11.0.51 (all py3-none), orjson built for CPython 3.12, and `purepy.zip`: sam2, hydra,
  omegaconf, antlr4, iopath and portalocker copied from this venv (pure Python, any 3.x).
  Not carried: imagecodecs (26 MB; the check's CPU reference on the device is nvImageCodec's CPU backend, verified
  bit for bit against hashes made here with imagecodecs), tiffslide (levels are read with tifffile directly) and DALI
  (199 MB; gpu.md §5.6).
- `.gpucheck/`: CMU-1-Small-Region.svs (real Aperio RGB JPEG), a small JPEG 2000 (33005) SVS written here, and
  `refs.json`: SHA-256 and mean RGB of every tile of both, decoded by the `cpu` reference decoder (imagecodecs).

Both folders are git-ignored; pass them to the device run with carry=[".whl", ".gpucheck"]. Prints the sizes and
fails if the total (with the working tree) would not fit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
DATA = ROOT / ".gpucheck"
LIMIT = 64 << 20
PINNED = ["nvidia-nvimgcodec-cu13==0.9.0.20", "nvidia-nvjpeg>=13.0,<13.1", "nvidia-nvjpeg2k-cu13==0.11.0.51"]
PURE = ["sam2", "hydra", "omegaconf", "antlr4", "iopath", "portalocker"]
SLIDES = Path(os.environ.get("ATLASPATCH_TEST_SLIDES", ROOT.parent / "shared" / "slides"))


def pip_download(args: list[str]) -> None:
    """`pip download --no-deps` into .whl/ (the registry's ordinary client)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS), *args],
                   check=True)


def pure_python_zip() -> Path:
    """Zip the pure-Python packages from this venv's site-packages (no compiled parts: checked)."""
    import sam2

    site = Path(sam2.__file__).resolve().parents[1]
    out = WHEELS / "purepy.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in PURE:
            for path in sorted((site / name).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    if path.suffix == ".so":
                        raise SystemExit(f"{path} is compiled: cannot carry {name} as pure Python")
                    zf.write(path, path.relative_to(site))
    return out


def write_j2k_slide(path: Path) -> Path:
    """A 1024×768 Aperio-style JPEG 2000 (33005) SVS of drawn tissue, 256-px tiles."""
    from atlaspatch_stream.testing.synthetic import write_synthetic_slide

    return write_synthetic_slide(path, width=1024, height=768, tile=256, levels=(1,), compression="jpeg2000",
                                 seed=21)


def tile_refs(path: Path) -> dict[str, object]:
    """SHA-256 and mean RGB of every level-0 tile, decoded by the `cpu` reference decoder."""
    import tifffile

    from atlaspatch_stream.backends.decoders.cpu import CpuDecoder
    from atlaspatch_stream.backends.tiles import page_meta, read_raw

    with tifffile.TiffFile(path) as tf:
        meta = page_meta(str(path), 0, 1.0, tf.pages[0])
    assert meta is not None, path
    fd = os.open(path, os.O_RDONLY)
    try:
        raws = [read_raw(fd, meta, t) for t in range(meta.grid.count)]
    finally:
        os.close(fd)
    pixels = CpuDecoder().decode_batch([r for r in raws if r is not None], meta).pixels
    return {"sha256": [hashlib.sha256(np.ascontiguousarray(p).tobytes()).hexdigest() for p in pixels],
            "mean_rgb": [np.asarray(p).reshape(-1, 3).mean(0).round(3).tolist() for p in pixels]}


def tree_bytes() -> int:
    """Bytes of the files git would carry (tracked and untracked-not-ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return sum((ROOT / f).stat().st_size for f in out if (ROOT / f).is_file())


def main() -> int:
    """Download, zip, write the data, report sizes."""
    shutil.rmtree(WHEELS, ignore_errors=True)
    shutil.rmtree(DATA, ignore_errors=True)
    WHEELS.mkdir()
    DATA.mkdir()
    pip_download(PINNED)
    pip_download(["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                  "--platform", "manylinux2014_x86_64", "orjson"])
    pure_python_zip()
    cmu = SLIDES / "aperio" / "CMU-1-Small-Region.svs"
    shutil.copy(cmu, DATA / cmu.name)
    j2k = write_j2k_slide(DATA / "j2k_33005.svs")
    refs = {"cmu1": tile_refs(DATA / cmu.name), "j2k": tile_refs(j2k)}
    (DATA / "refs.json").write_bytes(orjson.dumps(refs))
    sizes = {p.name: p.stat().st_size for folder in (WHEELS, DATA) for p in sorted(folder.iterdir())}
    total = sum(sizes.values()) + tree_bytes()
    for name, size in sizes.items():
        print(f"{size / 2**20:8.2f} MiB  {name}")
    print(f"{total / 2**20:8.2f} MiB  total with the working tree (limit {LIMIT / 2**20:.0f} MiB)")
    return 0 if total < LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
