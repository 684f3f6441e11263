"""End-to-end `process` vs the bare encoder forward on the same number of pre-decoded batches, in one run.

    python perf/bench_process.py [--slides 3] [--size 12000] [--encoder lunit_vit_small_patch16_dino]

Also times an upstream-style feature stage on the same coordinates (serial OpenSlide reads, PIL transforms, the model
cast to fp32 on CPU) and prints our speed-up over it. Writes large synthetic 40× slides (JPEG tiles, drawn tissue), runs the whole pipeline (otsu segmentation, tile-once
reading, cross-slide batches, one encoder with seeded random weights, H5 writing) and then the encoder alone on as many
random batches as the pipeline encoded. Prints one JSON line: wall time, encoder-alone time, their ratio (target
≤ 1.15: the pipeline hides everything but the encoder), per-stage busy seconds, mean queue fill per stream, peak RSS.
Appends the line to perf/results/bench_process.jsonl.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import anyio
import numpy as np
from common import machine, write_result  # perf/common.py (scripts run from perf/)

ROOT = Path(__file__).resolve().parents[1]


def write_slides(folder: Path, n: int, size: int) -> list[Path]:
    """`n` synthetic 40× slides of about size × 0.75·size pixels."""
    from atlaspatch_stream.testing.synthetic import write_synthetic_slide

    return [write_synthetic_slide(folder / f"bench_{i}.svs", width=size, height=int(size * 0.75), seed=10 + i,
                                  levels=(1, 4, 16, 32)) for i in range(n)]


def random_weights(name: str, folder: Path) -> Path:
    """A seeded random state dict for `name` in its published key names."""
    import torch
    from safetensors.torch import save_file

    from atlaspatch_stream.backends.encoders.registry import get_spec

    torch.manual_seed(0)
    model = get_spec(name).build()
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


async def run_pipeline(config, slides: list[Path]) -> tuple[float, dict, dict, list]:
    """Wall seconds, per-stage busy seconds, mean queue fill, results."""
    from atlaspatch_stream.api import make_jobs, open_pipeline

    busy: dict[str, float] = {}
    fills: dict[str, list[float]] = {}
    results = []
    async with open_pipeline(config, command="bench") as pipeline:
        started = time.perf_counter()

        async def sample() -> None:
            while True:
                for name, s in pipeline.statistics()["streams"].items():
                    fills.setdefault(name, []).append(s["used"] / max(1, s["size"]))
                await anyio.sleep(0.25)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            for job in make_jobs(slides, config):
                await pipeline.submit(job)
            await pipeline.close_input()
            async for result in pipeline.results():
                results.append(result)
                for stage, seconds in result.timings.items():
                    busy[stage] = busy.get(stage, 0.0) + seconds
            tg.cancel_scope.cancel()
        wall = time.perf_counter() - started
    return wall, busy, {k: round(float(np.mean(v)), 3) for k, v in fills.items()}, results


def encoder_alone(config, patches: int) -> float:
    """Seconds for the same encoder on `patches` random uint8 patches in batches of the configured size."""
    from atlaspatch_stream.backends.bundle import RealBackends

    [encoder] = RealBackends(config).make_encoders().encoders
    encoder.warm_up()
    size, batch = config.plan.patch_size, config.encode.batch_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    started = time.perf_counter()
    for start in range(0, patches, batch):
        encoder.encode(pixels[: min(batch, patches - start)])
    return time.perf_counter() - started


def upstream_style(config, out: Path, slides: list[Path]) -> float:
    """Seconds for upstream's feature stage on our coordinates, done the way upstream does it (reference §2.4, §5.2).

    Per patch and serially: OpenSlide `read_region` → RGB → cv2 INTER_LINEAR resize → PIL → torchvision transform;
    batches of `--feature-batch-size`; the whole model cast to the run's dtype (float16 on CPU falls back to float32,
    as upstream does). Same encoder, same random weights, same coordinates.
    """
    import cv2
    import h5py
    import openslide
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from atlaspatch_stream.backends.bundle import RealBackends

    [encoder] = RealBackends(config).make_encoders().encoders
    encoder.warm_up()
    model, spec = encoder._model.float().eval(), encoder.spec
    pre = spec.preprocess
    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[pre.interpolation]
    steps = [T.Resize(pre.resize, interpolation=interp, antialias=True)]
    steps += [T.CenterCrop(pre.crop)] if pre.crop else []
    transform = T.Compose([*steps, T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    size, batch = config.plan.patch_size, config.encode.batch_size
    started = time.perf_counter()
    for slide in slides:
        with h5py.File(out / "patches" / f"{slide.stem}.h5") as f:
            coords = f["coords"][...]
        osr = openslide.OpenSlide(str(slide))
        for start in range(0, len(coords), batch):
            tensors = []
            for x, y, rw, rh, lv in coords[start : start + batch].tolist():
                rgb = np.asarray(osr.read_region((x, y), lv, (rw, rh)).convert("RGB"))
                if rgb.shape[:2] != (size, size):
                    rgb = cv2.resize(rgb, (size, size))
                tensors.append(transform(Image.fromarray(rgb)))
            with torch.inference_mode():
                spec.forward(model, torch.stack(tensors)) if spec.forward else model(torch.stack(tensors))
        osr.close()
    return time.perf_counter() - started


def main() -> None:
    """Run both measurements and print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=3)
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--encoder", default="lunit_vit_small_patch16_dino")
    parser.add_argument("--precision", default="float16", help="as --feature-precision (default: upstream's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="encoder device (cpu, cuda)")
    parser.add_argument("--no-upstream", dest="upstream", action="store_false",
                        help="skip the upstream-style baseline (serial read_region + PIL + fp32 model)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from atlaspatch_stream.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        slides = write_slides(folder / "slides", args.slides, args.size)
        weights = random_weights(args.encoder, folder)
        config = load_config({
            "plan": {"patch_size": 224, "target_mag": 20},
            "segment": {"segmenter": "otsu", "device": "cpu"},
            "encode": {"extractors": (args.encoder,), "device": args.device, "precision": args.precision,
                       "batch_size": args.batch, "weights": ((args.encoder, weights),)},
            "write": {"output": folder / "out"},
        }, environ={})
        wall, busy, fills, results = anyio.run(run_pipeline, config, slides)
        patches = sum(r.num_patches or 0 for r in results)
        alone = encoder_alone(config, patches)
        upstream = upstream_style(config, folder / "out", slides) if args.upstream else None
    import torch

    line = {
        "bench": "process", "date": time.strftime("%Y-%m-%d"), "encoder": args.encoder, "precision": args.precision,
        "slides": len(slides), "slide_px": [args.size, int(args.size * 0.75)], "patches": patches,
        "wall_s": round(wall, 2), "encoder_alone_s": round(alone, 2), "ratio_wall_to_encoder": round(wall / alone, 3),
        "upstream_style_feature_stage_s": round(upstream, 2) if upstream else None,
        "speedup_vs_upstream_style": round(upstream / wall, 2) if upstream else None,
        "patches_per_s": round(patches / wall, 1), "slides_per_h": round(len(slides) / wall * 3600, 1),
        "stage_busy_s": {k: round(v, 2) for k, v in busy.items()}, "queue_fill_mean": fills,
        "statuses": sorted({r.status for r in results}),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": machine("torch", "timm", "imagecodecs", torch_threads=torch.get_num_threads()),
    }
    write_result("bench_process", line)


if __name__ == "__main__":
    sys.exit(main())
