"""Benchmark: thumbnails/s of the batched SAM2 segmenter vs one-at-a-time `SAM2ImagePredictor` (upstream's way).

Both run in the same process on the same model (SAM2.1 Hiera-T, seeded random weights written to a temporary file:
speed does not depend on the weights) and the same thumbnails: ~1024-px thumbnails of the real slides in
../shared/slides (read with tiffslide at the coarsest level that is still >= 1024 px, then PIL `thumbnail`), padded
with synthetic drawn-tissue images up to `--images`. The baseline squashes each thumbnail to 1024² with PIL
BILINEAR, calls `set_image` + `predict(box=[0,0,1024,1024], multimask_output=False)` and resizes back NEAREST, as
upstream's single-image path does. The JSON line also says whether every mask was identical.

It then compares the whole stage on large synthetic slides: the pipeline (thumbnails built by the opener pool while
SAM2 runs) against upstream's batch-1 order (read the thumbnail, then infer, slide after slide).

Prints ONE JSON line and appends it to perf/results/bench_segment.jsonl. Usage:
    python perf/bench_segment.py [--images 6] [--batch-size 3] [--device cpu|cuda] [--precision float32] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import time
from pathlib import Path

import anyio
import numpy as np
import torch
from common import machine, write_result  # perf/common.py (scripts run from perf/)
from PIL import Image

from atlaspatch_stream.backends.segment_sam2 import Sam2Segmenter
from atlaspatch_stream.testing.sam2_weights import write_random_sam2_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SLIDES = Path(os.environ.get("ATLASPATCH_TEST_SLIDES", ROOT.parent / "shared" / "slides"))
REAL = ["aperio/CMU-1-Small-Region.svs", "hamamatsu/test3-DAPI-2-387.ndpi", "generic-tiff/boxes.tiff"]


def slide_thumbnail(path: Path, max_size: int = 1024) -> np.ndarray:
    """RGB uint8 thumbnail <= max_size of a slide: the coarsest level still >= max_size (or level 0), PIL-shrunk."""
    import tiffslide

    with tiffslide.TiffSlide(path) as slide:
        dims = slide.level_dimensions
        level = max((i for i, (w, h) in enumerate(dims) if max(w, h) >= max_size), default=0)
        image = slide.read_region((0, 0), level, dims[level]).convert("RGB")
    image.thumbnail((max_size, max_size))
    return np.asarray(image)


def synthetic_thumbnail(seed: int) -> np.ndarray:
    """A drawn-tissue thumbnail (pink ellipses on noisy glass) of a random size up to 1024 px."""
    import cv2

    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(400, 1025)), int(rng.integers(400, 1025))
    rgb = np.full((height, width, 3), 236, np.uint8)
    for _ in range(3):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(40, width // 3)), int(rng.integers(40, height // 3)))
        cv2.ellipse(rgb, center, axes, float(rng.uniform(0, 180)), 0, 360, (200, 110, 170), -1)
    return np.clip(rgb.astype(np.int16) + rng.integers(-15, 16, rgb.shape), 0, 255).astype(np.uint8)


def thumbnails(count: int) -> tuple[list[np.ndarray], list[str]]:
    """Real-slide thumbnails (those present) then synthetic ones, `count` in all, with their names."""
    images, names = [], []
    for relative in REAL:
        if len(images) < count and (SLIDES / relative).exists():
            images.append(slide_thumbnail(SLIDES / relative))
            names.append(relative)
    for seed in range(count - len(images)):
        images.append(synthetic_thumbnail(seed))
        names.append(f"synthetic-{seed}")
    return images, names


def predictor_masks(model: torch.nn.Module, images: list[np.ndarray]) -> list[np.ndarray]:
    """Upstream's single-image path with sam2's SAM2ImagePredictor, one thumbnail at a time."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model, mask_threshold=0.0)
    masks = []
    with torch.inference_mode():
        for image in images:
            predictor.set_image(Image.fromarray(image).resize((1024, 1024), Image.BILINEAR))
            out, _, _ = predictor.predict(box=np.array([0, 0, 1024, 1024]), multimask_output=False)
            back = Image.fromarray((out[0] > 0.5).astype(np.uint8) * 255)
            masks.append(np.asarray(back.resize((image.shape[1], image.shape[0]), Image.NEAREST)) > 127)
    return masks


def timed(function, *args):  # type: ignore[no-untyped-def]
    """(result, seconds), with device work finished before the clock stops."""
    start = time.perf_counter()
    result = function(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def stage_comparison(checkpoint: Path, device: str, batch: int, count: int, size: int) -> dict[str, object]:
    """Whole segmentation stage on large synthetic slides: our pipeline (thumbnails read by the opener pool while
    SAM2 runs batches, then contours, lattice and H5) vs upstream's batch-1 order (thumbnail, then inference, per slide).
    """
    from atlaspatch_stream.backends.slides import open_slide
    from atlaspatch_stream.config import load_config
    from atlaspatch_stream.testing.synthetic import write_synthetic_slide

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "slides"
        slides = [write_synthetic_slide(folder / f"s{i}.svs", width=size, height=size * 3 // 4, seed=20 + i,
                                        levels=(1, 4, 16)) for i in range(count)]
        segmenter = Sam2Segmenter(device, "float32", checkpoint, 1)
        segmenter.warm_up()
        started = time.perf_counter()
        for path in slides:
            with open_slide(path) as handle:
                segmenter.segment([handle.thumbnail(1.25, 1024, 512)])
        sequential = time.perf_counter() - started
        segmenter.close()
        config = load_config({"plan": {"patch_size": 256, "target_mag": 20},
                              "segment": {"segmenter": "sam2", "device": device, "seg_batch_size": batch,
                                          "seg_weights": checkpoint},
                              "write": {"output": Path(tmp) / "out"}}, environ={})
        ours, statuses = anyio.run(_timed_pipeline, config, slides)
    return {"slides": count, "slide_px": [size, size * 3 // 4], "sequential_s": round(sequential, 2),
            "pipeline_s": round(ours, 2), "stage_ratio": round(sequential / ours, 3), "statuses": statuses}


async def _timed_pipeline(config: object, slides: list[Path]) -> tuple[float, list[str]]:
    """Seconds from the first submitted slide to the last result (model loading excluded, as for the baseline)."""
    from atlaspatch_stream.api import make_jobs, open_pipeline

    statuses: list[str] = []
    async with open_pipeline(config) as pipeline, anyio.create_task_group() as tg:  # type: ignore[arg-type]
        started = time.perf_counter()

        async def feed() -> None:
            for job in make_jobs(slides, config):  # type: ignore[arg-type]
                await pipeline.submit(job)
            await pipeline.close_input()

        tg.start_soon(feed)
        statuses = sorted({r.status async for r in pipeline.results()})
        return time.perf_counter() - started, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--stage-slides", type=int, default=4, help="large synthetic slides for the stage comparison")
    parser.add_argument("--stage-size", type=int, default=24000, help="their width in pixels")
    args = parser.parse_args()

    images, names = thumbnails(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_random_sam2_checkpoint(Path(tmp) / "model.pth", seed=0)
        segmenter = Sam2Segmenter(args.device, args.precision, checkpoint, args.batch_size)
        _, warm_s = timed(segmenter.warm_up)
        stage = (stage_comparison(checkpoint, args.device, args.batch_size, args.stage_slides, args.stage_size)
                 if args.stage_slides else None)
    predictor_masks(segmenter.model, images[:1])  # warm the baseline path too (jit-scripted transforms)
    ours, ours_s = timed(segmenter.segment, images)
    theirs, theirs_s = timed(predictor_masks, segmenter.model, images)
    segmenter.close()
    equal = all(isinstance(a, np.ndarray) and np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
    line = {
        "bench": "segment",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "images": len(images),
        "thumbnails": names,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "batched_thumbs_per_s": round(len(images) / ours_s, 3),
        "predictor_thumbs_per_s": round(len(images) / theirs_s, 3),
        "ratio": round(theirs_s / ours_s, 3),
        "masks_equal": equal,
        "stage": stage,
        "warm_up_s": round(warm_s, 2),
        "machine": machine("torch", "sam2", device=args.device, torch_threads=torch.get_num_threads(),
                           gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
    }
    write_result("bench_segment", line, append=not args.no_append)


if __name__ == "__main__":
    main()
