"""Shared by the scaling tests: small synthetic slides, the CLI and config for them, and output comparisons."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import h5py
import numpy as np
import orjson

from atlaspatch_stream.config import PipelineConfig, load_config
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

CLI = [sys.executable, "-c", "from atlaspatch_stream.cli import main; main()"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
COUNT = 8
PROCESS = ["--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu",
           "--feature-extractors", "color_stats"]


def write_slides(folder: Path, count: int, *, width: int = 2048, height: int = 1536) -> Path:
    """`count` small synthetic 40× slides `he00.svs`... of different sizes (big-first order is not the name order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_synthetic_slide(folder / f"he{i:02d}.svs", width=width + 256 * (i % 3), height=height, seed=i)
    return folder


def config(out: Path) -> PipelineConfig:
    """What `PROCESS` asks for, as a config (for in-process runs)."""
    return load_config({"plan": {"patch_size": 256, "target_mag": 20},
                        "segment": {"segmenter": "otsu", "device": "cpu"},
                        "encode": {"extractors": ("color_stats",), "device": "cpu"},
                        "write": {"output": out}}, environ={})


def outputs(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """stem -> coords and every feature set of each H5 under out/patches."""
    found = {}
    for path in sorted((out / "patches").glob("*.h5")):
        with h5py.File(path, "r") as f:
            arrays = {"coords": f["coords"][...]}
            arrays.update({f"features/{n}": f["features"][n][...] for n in f.get("features", {})})
            assert arrays["coords"].shape[0] == int(f.attrs["num_patches"]), path
            found[path.stem] = arrays
    return found


def assert_same_outputs(out: Path, reference: Path) -> None:
    """The same slides, and for each the same coordinates and features, as the reference run's."""
    mine, theirs = outputs(out), outputs(reference)
    assert sorted(mine) == sorted(theirs)
    for stem, arrays in theirs.items():
        assert sorted(mine[stem]) == sorted(arrays), stem
        for name, value in arrays.items():
            np.testing.assert_array_equal(mine[stem][name], value, err_msg=f"{stem} {name}")


def events(out: Path) -> list[dict]:
    """Every line of the run report(s) under `out`."""
    path = out / "atlaspatch-report.jsonl"
    if not path.exists():
        return []
    complete = path.read_bytes().split(b"\n")[:-1]  # a line still being written (the run goes on) has no newline yet
    return [orjson.loads(line) for line in complete if line.strip()]


def slide_events(out: Path) -> list[dict]:
    """The report's one-per-slide lines."""
    return [e for e in events(out) if e["event"] == "slide"]
