"""`encode-slide` streamed (slide embeddings as each slide's patch features complete) vs upstream's two-pass order.

    python perf/bench_encode_slide.py [--slides 4] [--size 4096] [--small] [--repeats 2] [--work DIR] [--no-append]

Writes synthetic 40x slides, a seeded random Lunit ViT-S/8 (MOOZY's patch encoder) and a seeded random MOOZY
checkpoint of the real shape (768 wide, 6 layers, 3 case layers; `--small` for a tiny one), then measures in this
process, each case twice side by side:
- from raw slides: ours = one `encode-slide` run (patch features and slide embeddings in one pipeline); two-pass =
  the whole patch pipeline, then every H5 re-opened and embedded in a loop (upstream 1.1's order);
- from existing patch features: ours = `encode-slide` over the finished H5s (reused, embedded as each is
  admitted); two-pass = the patch pipeline (everything skipped), then the same loop.
Each pair runs `--repeats` times in alternating order (the minimum is reported). Embeddings of both orders are checked
equal. Prints one JSON line with the wall times and the ratios two-pass/ours, with the machine, and appends it to
perf/results/bench_encode_slide.jsonl.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from common import machine, write_result  # perf/common.py (scripts run from perf/)

from atlaspatch_stream.assembly import make_slide_embedder
from atlaspatch_stream.backends.encoders.slide_registry import plan_slide_encoders
from atlaspatch_stream.config import PipelineConfig, load_config
from atlaspatch_stream.sync import process_slides
from atlaspatch_stream.testing.slide_models import write_lunit_weights, write_moozy_checkpoint
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

PATCH_ENCODER = "lunit_vit_small_patch8_dino"


def prepare(work: Path, slides: int, size: int, small: bool) -> tuple[list[Path], Path, Path]:
    """Slides and weights under `work` (written once, reused)."""
    folder = work / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(slides):
        path = folder / f"s{i}.svs"
        if not path.exists():
            write_synthetic_slide(path, width=size, height=size * 3 // 4, seed=i)
        paths.append(path)
    lunit = work / "lunit.safetensors"
    if not lunit.exists():
        write_lunit_weights(lunit, seed=0)
    moozy = work / ("moozy_small.pt" if small else "moozy.pt")
    if not moozy.exists():
        shape = {} if small else {"d_model": 768, "layers": 6, "heads": 12, "case_layers": 3}
        write_moozy_checkpoint(moozy, seed=0, **shape)
    return paths, lunit, moozy


def config(out: Path, lunit: Path, moozy: Path, slide_encoders: bool) -> PipelineConfig:
    """CPU, float32, otsu; with or without the moozy slide encoder."""
    base = load_config({
        "plan": {"patch_size": 224, "target_mag": 20},
        "segment": {"segmenter": "otsu", "device": "cpu"},
        "encode": {"device": "cpu", "precision": "float32", "batch_size": 16, "extractors": (PATCH_ENCODER,),
                   "weights": (("moozy", moozy), (PATCH_ENCODER, lunit))},
        "write": {"output": out},
    }, environ={})
    return plan_slide_encoders(base, ["moozy"]) if slide_encoders else base


def streamed(slides: list[Path], cfg: PipelineConfig) -> float:
    """One pipeline run with the slide encoder in it."""
    started = time.perf_counter()
    summary = process_slides(slides, cfg, command="encode-slide")
    assert summary.ok, [r.message for r in summary.failed]
    return time.perf_counter() - started


def two_pass(slides: list[Path], cfg: PipelineConfig, embed_cfg: PipelineConfig) -> float:
    """The whole patch pipeline, then the slide encoder over every H5 (upstream's order)."""
    started = time.perf_counter()
    summary = process_slides(slides, cfg, command="process")
    assert summary.ok, [r.message for r in summary.failed]
    embedder = make_slide_embedder(embed_cfg)
    embedder.warm_up()
    for path in slides:
        embedder.embed(cfg.write.output / "patches" / f"{path.stem}.h5")
    embedder.close()
    return time.perf_counter() - started


def embeddings(out: Path) -> dict[str, np.ndarray]:
    """Every slide's moozy embedding under `out`."""
    found = {}
    for path in sorted((out / "patches").glob("*.h5")):
        with h5py.File(path, "r") as f:
            found[path.stem] = f["slide_features/moozy"][...]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--size", type=int, default=4096, help="level-0 width of each 40x slide (height 3/4 of it)")
    parser.add_argument("--small", action="store_true", help="a tiny MOOZY instead of the real shape")
    parser.add_argument("--work", type=Path, default=None, help="keep slides and weights here")
    parser.add_argument("--repeats", type=int, default=2, help="pairs run, in alternating order (min reported)")
    parser.add_argument("--no-append", action="store_true", help="do not append to perf/results")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_encode_slide_"))
    slides, lunit, moozy = prepare(work, args.slides, args.size, args.small)
    ours_out, base_out = work / "ours", work / "two_pass"
    times: dict[str, list[float]] = {"raw_ours": [], "raw_base": [], "existing_ours": [], "existing_base": []}
    same = True
    for repeat in range(args.repeats):
        for first in (("ours", "base") if repeat % 2 == 0 else ("base", "ours")):  # alternate the order
            out = ours_out if first == "ours" else base_out
            shutil.rmtree(out, ignore_errors=True)
            times[f"raw_{first}"].append(run_one(first, slides, out, lunit, moozy))
        ours, base = embeddings(ours_out), embeddings(base_out)
        same = same and ours.keys() == base.keys() and all(np.array_equal(v, base[k]) for k, v in ours.items())
        for first in (("ours", "base") if repeat % 2 == 0 else ("base", "ours")):
            out = ours_out if first == "ours" else base_out
            times[f"existing_{first}"].append(run_one(first, slides, out, lunit, moozy, drop_embeddings=True))
    raw_ours, raw_base = min(times["raw_ours"]), min(times["raw_base"])
    existing_ours, existing_base = min(times["existing_ours"]), min(times["existing_base"])
    write_result("bench_encode_slide", {
        "bench": "encode_slide", "slides": len(slides), "size": args.size, "moozy": "small" if args.small else "real",
        "raw": {"ours_s": round(raw_ours, 2), "two_pass_s": round(raw_base, 2),
                "ratio_two_pass_over_ours": round(raw_base / raw_ours, 3)},
        "existing_features": {"ours_s": round(existing_ours, 2), "two_pass_s": round(existing_base, 2),
                              "ratio_two_pass_over_ours": round(existing_base / existing_ours, 3)},
        "repeats": args.repeats, "all_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "embeddings_equal": same, "machine": machine("torch", "timm", "moozy"),
    }, append=not args.no_append)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def run_one(which: str, slides: list[Path], out: Path, lunit: Path, moozy: Path, drop_embeddings: bool = False
            ) -> float:
    """One timed run of `which` ("ours" or "base") into `out`; `drop_embeddings` keeps the patch features only."""
    if drop_embeddings:
        for path in (out / "patches").glob("*.h5"):
            with h5py.File(path, "a") as f:
                del f["slide_features"]
    if which == "ours":
        return streamed(slides, config(out, lunit, moozy, True))
    return two_pass(slides, config(out, lunit, moozy, False), config(out, lunit, moozy, True))


if __name__ == "__main__":
    sys.exit(main())
