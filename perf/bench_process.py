"""End-to-end `process` under allocator settings side by side, vs the bare encoder and an upstream-style stage.

    python perf/bench_process.py [--slides 3] [--size 12000] [--encoder lunit_vit_small_patch16_dino]
                                 [--allocators cli_default,glibc_defaults[,small_footprint,mmap_32mib]]
                                 [--rounds 1] [--decoder auto] [--work DIR] [--no-upstream] [--upstream-workers 4]
                                 [--emulate-no-avx512]
                                 [--variant read.slides_in_parallel=1 [--variant ...]] [--baseline-tree DIR]
                                 [--baseline-allocators small_footprint]

Writes large synthetic 40× slides (JPEG tiles, drawn tissue) and seeded random weights, then measures, each in its
own process (so each peak RSS is that run's own, not the slide writer's): the whole pipeline (otsu segmentation,
tile-once reading, cross-slide batches, one encoder, H5 writing) under each allocator configuration of
`--allocators` (`allocators()`: `cli_default` is what `atlaspatch process` does on this CPU, `glibc_defaults` the
library as is), alternated for `--rounds` rounds with the order rotated; the encoder alone on as many random
batches; and an upstream-style feature stage on the same coordinates (serial OpenSlide reads, a DataLoader per batch
with `--upstream-workers` forked workers as upstream's `--feature-num-workers`, the model cast to fp32 on CPU). Each
run's memory is noted twice: its process's peak RSS (VmHWM), and the whole job's peak (`job_memory_mb`, sampled: the
process's RSS plus the private pages of its forked workers, which VmHWM leaves out). Prints one JSON line: per
configuration the median wall, user and system seconds and peak RSS with the paired wall ratio to the first
configuration; the first configuration's ratios to the encoder
alone (target ≤ 1.15) and to the upstream-style stage (wall and peak RSS); per-stage busy seconds; the CPU flags
that decide precision and allocator (AVX-512, AVX-512 BF16, AMX). `--emulate-no-avx512` runs every measurement with
torch, oneDNN and MKL kept to AVX2, a CPU without AVX-512 as far as the forward pass goes (JPEG decoding and the
rest keep their own dispatch). `--variant SECTION.KEY=VALUE[,...]` runs the
pipeline once more with those settings changed. `--work DIR` keeps the slides and weights there (written once,
reused). `--baseline-tree DIR` runs the pipeline from another checkout as well (e.g. `git worktree add /tmp/before
<commit>`), in every round beside the others, to show a change costs no speed (the ratio paired round by round),
under `--baseline-allocators` (what 1ea700c's CLI set, by default). Appends the line to perf/results/bench_process.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import numpy as np
from common import WITHOUT_AVX512, cpu_flags, machine, write_result  # perf/common.py (scripts run from perf/)

ROOT = Path(__file__).resolve().parents[1]


def write_slides(folder: Path, n: int, size: int, tile: int) -> list[Path]:
    """`n` synthetic 40× slides of about size × 0.75·size pixels in JPEG tiles of `tile` pixels."""
    from atlaspatch_stream.testing.synthetic import write_synthetic_slide

    return [write_synthetic_slide(folder / f"bench_{i}.svs", width=size, height=int(size * 0.75), seed=10 + i,
                                  levels=(1, 4, 16, 32), tile=tile) for i in range(n)]


def random_weights(name: str, folder: Path) -> Path:
    """A seeded random state dict for `name` in its published key names (empty for a weight-free encoder)."""
    import torch
    from safetensors.torch import save_file

    from atlaspatch_stream.backends.encoders.registry import get_spec

    torch.manual_seed(0)
    model = get_spec(name).build()
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def queue_fills(statistics) -> dict[str, float]:  # noqa: ANN001
    """Each queue's fill from a pipeline's statistics: `EngineStatistics`, or the dict of trees before the run layer
    (`--baseline-tree`)."""
    if isinstance(statistics, dict):
        return {name: edge["used"] / max(edge["size"], 1) for name, edge in statistics["streams"].items()}
    return {name: edge.fill for name, edge in statistics.streams.items()}


async def run_pipeline(config, slides: list[Path], trim: bool = False) -> tuple[float, dict, dict, list]:
    """Wall seconds, per-stage busy seconds, mean queue fill, results; with `trim`, freed memory is given back after
    each slide as the CLI does it."""
    from atlaspatch_stream.api import make_jobs, open_pipeline

    busy: dict[str, float] = {}
    fills: dict[str, list[float]] = {}
    results = []
    async with open_pipeline(config, command="bench") as pipeline:
        started = time.perf_counter()

        async def sample() -> None:
            while True:
                for name, fill in queue_fills(pipeline.statistics()).items():
                    fills.setdefault(name, []).append(fill)
                await anyio.sleep(0.25)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            for job in make_jobs(slides, config):
                await pipeline.submit(job)
            await pipeline.close_input()
            async for result in pipeline.results():
                if trim:
                    from atlaspatch_stream.cli.allocator import release_free_memory

                    release_free_memory()
                results.append(result)
                for stage, seconds in result.timings.items():
                    busy[stage] = busy.get(stage, 0.0) + seconds
            tg.cancel_scope.cancel()
        wall = time.perf_counter() - started
    return wall, busy, {k: round(float(np.mean(v)), 3) for k, v in fills.items()}, results


def encoder_alone(config, patches: int) -> float:
    """Seconds for the same encoder on `patches` random uint8 patches in batches of the configured size."""
    from atlaspatch_stream.assembly import RealBackends

    [encoder] = RealBackends(config).make_encoders().encoders
    encoder.warm_up()
    size, batch = config.plan.patch_size, config.encode.batch_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    started = time.perf_counter()
    for start in range(0, patches, batch):
        encoder.encode(pixels[: min(batch, patches - start)])
    return time.perf_counter() - started


class _Buffered:
    """The patches of one buffered batch as a map-style dataset, transformed on access (upstream's loader input)."""

    def __init__(self, patches: list, transform) -> None:  # noqa: ANN001
        self.patches, self.transform = patches, transform

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int):  # noqa: ANN204
        from PIL import Image

        return self.transform(Image.fromarray(self.patches[index]))


def upstream_style(config, out: Path, slides: list[Path], workers: int) -> float:
    """Seconds for upstream's feature stage on our coordinates, done the way upstream does it (reference §2.4, §5.2).

    Per patch and serially in the main process: OpenSlide `read_region` → RGB → cv2 INTER_LINEAR resize; each batch of
    `--feature-batch-size` goes through a new `DataLoader` (batch size = the buffer, `workers` worker processes:
    upstream's `--feature-num-workers`, default 4, forked per batch) that applies the torchvision transform; the whole
    model cast to the run's dtype (float16 on CPU falls back to float32, as upstream does); each batch's features
    appended to an H5 dataset. Same encoder, same random weights, same coordinates; the model is built as upstream
    builds it (`loading.materialize`), without the preparation our CPU encoders get (folded batch norms,
    channels-last), which the stage ran with until 2026-12-07.
    """
    import cv2
    import h5py
    import openslide
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    from atlaspatch_stream.backends.encoders.loading import materialize
    from atlaspatch_stream.backends.encoders.registry import get_spec

    spec = get_spec(config.encode.extractors[0])
    # built and loaded as upstream does it: no batch norms folded, no channels-last layout
    model = materialize(spec, dict(config.encode.weights).get(spec.name)).float().eval()
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
        with h5py.File(out / f"upstream_{slide.stem}.h5", "w") as sink:
            features = None
            for start in range(0, len(coords), batch):
                patches = []
                for x, y, rw, rh, lv in coords[start : start + batch].tolist():
                    rgb = np.asarray(osr.read_region((x, y), lv, (rw, rh)).convert("RGB"))
                    patches.append(rgb if rgb.shape[:2] == (size, size) else cv2.resize(rgb, (size, size)))
                loader = DataLoader(_Buffered(patches, transform), batch_size=len(patches), num_workers=workers,
                                    shuffle=False, pin_memory=False)
                with torch.inference_mode():
                    for tensors in loader:
                        rows = (spec.forward(model, tensors) if spec.forward else model(tensors)).float().numpy()
                if features is None:
                    features = sink.create_dataset("features", shape=(0, rows.shape[1]), maxshape=(None, rows.shape[1]),
                                                   chunks=(batch, rows.shape[1]), dtype="float32")
                features.resize(features.shape[0] + len(rows), axis=0)
                features[-len(rows):] = rows
        osr.close()
    return time.perf_counter() - started


def openslide_read(out: Path, slides: list[Path], threads: int = 2) -> float:
    """Seconds for OpenSlide only reading the same patches as RGB arrays, one handle per thread on `threads` threads
    (the floor a weight-free job is held to)."""
    from concurrent.futures import ThreadPoolExecutor

    import h5py
    import openslide

    local = threading.local()

    def read(slide: Path, rows: np.ndarray) -> int:
        handles = local.__dict__.setdefault("handles", {})
        osr = handles.get(slide) or handles.setdefault(slide, openslide.OpenSlide(str(slide)))
        for x, y, rw, rh, lv in rows.tolist():
            np.asarray(osr.read_region((x, y), lv, (rw, rh)).convert("RGB"))
        return len(rows)

    work = []
    for slide in slides:
        with h5py.File(out / "patches" / f"{slide.stem}.h5") as f:
            coords = f["coords"][...]
        work += [(slide, coords[i : i + 32]) for i in range(0, len(coords), 32)]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sum(pool.map(lambda item: read(*item), work))
    return time.perf_counter() - started


def make_config(args: argparse.Namespace, folder: Path, weights: Path, out: str = "out"):  # noqa: ANN201
    """The run's configuration (otsu, patch 224 at 20×, one encoder with local random weights), plus the child's
    `--override` settings."""
    import orjson

    from atlaspatch_stream.config import load_config

    settings: dict = {
        "plan": {"patch_size": 224, "target_mag": 20},
        "segment": {"segmenter": "otsu", "device": "cpu"},
        "encode": {"extractors": (args.encoder,), "device": args.device, "precision": args.precision,
                   "batch_size": args.batch, "weights": ((args.encoder, weights),) if weights.stat().st_size > 64 else ()},
        "read": {"decoder": args.decoder} if args.decoder != "auto" else {},  # older trees know no decoder key
        "write": {"output": folder / out},
    }
    for key, value in orjson.loads(args.override).items():
        section, name = key.split(".", 1)
        settings.setdefault(section, {})[name] = value
    return load_config(settings, environ={})


def parse_variant(text: str) -> dict[str, object]:
    """`read.slides_in_parallel=1,queues.patches=4` -> {"read.slides_in_parallel": 1, "queues.patches": 4}."""
    import json

    out: dict[str, object] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set size (MB): VmHWM, which exec resets (ru_maxrss survives fork + exec, so a
    child would report the slide-writing parent's peak)."""
    return round(_kb("/proc/self/status", ("VmHWM",)) / 1024, 1)


def child(args: argparse.Namespace) -> None:
    """One measurement in a fresh process (so its peak RSS is its own); prints one JSON line for the parent."""
    import orjson

    folder = Path(args.folder)
    config = make_config(args, folder, folder / f"{args.encoder}.safetensors", args.out)
    slides = sorted((folder / "slides").glob("*.svs"))
    if args.child == "pipeline":
        wall, busy, fills, results = anyio.run(run_pipeline, config, slides, args.trim)
        out = {"wall_s": wall, "busy": busy, "fills": fills, "patches": sum(r.num_patches or 0 for r in results),
               "statuses": sorted({r.status for r in results})}
    elif args.child == "openslide":
        out = {"wall_s": openslide_read(folder / args.out, slides)}
    elif args.child == "encoder":
        out = {"wall_s": encoder_alone(config, args.patches)}
    else:
        out = {"wall_s": upstream_style(config, folder / args.out, slides, args.upstream_workers)}
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + orjson.dumps({**out, "peak_rss_mb": peak_rss_mb(), "user_s": usage.ru_utime,
                                    "sys_s": usage.ru_stime}).decode())


def _commit(tree: str) -> str:
    """The short commit of a checkout."""
    import subprocess

    return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip()


def allocators(environ: dict[str, str]) -> dict[str, tuple[dict[str, str], bool]]:
    """The allocator configurations a pipeline run can take, as (glibc variables, trim after each slide):
    `cli_default` is what `atlaspatch` chooses on this CPU under `environ` (`cli.allocator`); `glibc_defaults` is the
    library as is; `small_footprint` the fixed 1 MiB mmap threshold and two arenas (the CLI's choice on CPUs without
    native bf16); `mmap_32mib` glibc's defaults with a fixed 32 MiB threshold; `arenas_2` glibc's dynamic threshold
    with two arenas, trimmed after each slide."""
    from atlaspatch_stream.cli.allocator import SMALL_FOOTPRINT, choose_settings
    from atlaspatch_stream.cpu import read_cpu_flags

    def variables(settings: dict[str, tuple[int, int]]) -> dict[str, str]:
        return {name: str(value) for name, (_, value) in settings.items()}

    chosen = choose_settings(read_cpu_flags(), environ)
    return {"cli_default": (variables(chosen), True), "glibc_defaults": ({}, False),
            "small_footprint": (variables(SMALL_FOOTPRINT), False),
            "mmap_32mib": ({"MALLOC_MMAP_THRESHOLD_": "33554432"}, False),
            "arenas_2": ({"MALLOC_ARENA_MAX": "2"}, True)}


def emulated(args: argparse.Namespace) -> dict[str, str]:
    """The environment every measurement runs under: `WITHOUT_AVX512` with `--emulate-no-avx512`, else nothing."""
    return dict(WITHOUT_AVX512) if args.emulate_no_avx512 else {}


def spawn(args: argparse.Namespace, folder: Path, what: str, env: dict[str, str] | None = None,
          patches: int = 0, out: str = "out", override: dict | None = None, trim: bool = False,
          launcher: tuple[str, ...] = ()) -> dict:
    """Run `child` in a subprocess (through `launcher`'s interpreter arguments, e.g. `-m memray run ...`, if given)
    and return its result line, with the whole job's sampled peak memory."""
    import shutil
    import subprocess

    import orjson

    if what == "pipeline":
        shutil.rmtree(folder / out, ignore_errors=True)  # a kept --work folder: no H5 of an earlier run is reused
    command = [sys.executable, *launcher, __file__, "--child", what, "--folder", str(folder), "--encoder", args.encoder,
               "--precision", args.precision, "--batch", str(args.batch), "--device", args.device,
               "--decoder", args.decoder, "--patches", str(patches), "--out", out,
               "--override", orjson.dumps(override or {}).decode(),
               "--upstream-workers", str(args.upstream_workers)] + (["--trim"] if trim else [])
    plain = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**plain, **emulated(args), **(env or {})}, cwd=Path(__file__).parent)
    streams: list[str] = []
    reader = threading.Thread(target=lambda: streams.extend(proc.communicate()))
    reader.start()
    job_peak = 0.0
    while reader.is_alive():
        job_peak = max(job_peak, job_memory_mb(proc.pid))
        reader.join(JOB_SAMPLE_S)
    stdout, stderr = streams
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{what} child failed:\n{stderr[-3000:]}")
    return {**orjson.loads(lines[-1][len("RESULT "):]), "job_peak_mb": round(job_peak, 1)}


BEFORE = "before"  # the --baseline-tree pipeline among the alternated configurations
JOB_SAMPLE_S = 0.05  # how often the whole job's memory is sampled


def _descendants(pid: int) -> list[int]:
    """The live descendants of `pid` (the children forked by any of its threads, recursively)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                kids = [int(kid) for kid in children.read_text().split()]
            except OSError:  # the thread or process ended meanwhile
                continue
            found += kids
            todo += kids
    return found


def _kb(path: str, fields: tuple[str, ...]) -> int:
    """The sum of these `Field:  N kB` lines of a /proc file (0 once the process is gone)."""
    try:
        with open(path) as fh:
            return sum(int(line.split()[1]) for line in fh if line.split(":", 1)[0] in fields)
    except (OSError, ValueError, IndexError):
        return 0


def job_memory_mb(pid: int) -> float:
    """The whole job's resident memory now (MB): the process's RSS plus each descendant's private pages (what a forked
    DataLoader worker allocated or copied on write). Pages a worker still shares with the process are counted once,
    in the process, so the sum never counts a page twice; pages shared only among workers are left out, in the
    workers' favour."""
    own = _kb(f"/proc/{pid}/status", ("VmRSS",))
    workers = sum(_kb(f"/proc/{kid}/smaps_rollup", ("Private_Clean", "Private_Dirty")) for kid in _descendants(pid))
    return (own + workers) / 1024


def alternate(args: argparse.Namespace, folder: Path, names: list[str]) -> dict[str, dict]:
    """Each allocator configuration (and `--baseline-tree`, as BEFORE) once per round, the order rotated each round
    (so drift on a shared machine hits all alike); per configuration the median wall, CPU and peak RSS, and the median
    of its per-round wall ratio to the first configuration."""
    configs = allocators(emulated(args))
    if args.baseline_tree:  # the older tree as its CLI ran it (commit 1ea700c: the fixed 1 MiB threshold, two arenas)
        env, trim = configs[args.baseline_allocators]
        configs[BEFORE] = ({"PYTHONPATH": str(Path(args.baseline_tree).resolve()), **env}, trim)
        names = [*names, BEFORE]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in order:
            env, trim = configs[name]
            runs[name].append(spawn(args, folder, "pipeline", env, out=f"out_{name}", trim=trim))
    first = runs[names[0]]
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "env": configs[name][0], "trim_after_each_slide": configs[name][1],
            **{key: round(float(np.median([r[key] for r in rs])), 2)
               for key in ("wall_s", "user_s", "sys_s", "peak_rss_mb", "job_peak_mb")},
            "wall_s_runs": [round(r["wall_s"], 1) for r in rs], "peak_rss_mb_runs": [r["peak_rss_mb"] for r in rs],
            f"wall_over_{names[0]}_paired": round(float(np.median([r["wall_s"] / f["wall_s"]
                                                                  for r, f in zip(rs, first, strict=True)])), 3),
            "patches": rs[0]["patches"], "statuses": rs[0]["statuses"], "busy": rs[-1]["busy"],
        }
    if BEFORE in summary:
        summary[BEFORE]["ours_over_before_paired"] = round(float(np.median(
            [f["wall_s"] / r["wall_s"] for r, f in zip(runs[BEFORE], first, strict=True)])), 3)
    return summary


def main() -> None:
    """Write slides and weights, measure each part in its own process, print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=3)
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--tile", type=int, default=256, help="JPEG tile size of the written slides")
    parser.add_argument("--openslide-read", action="store_true",
                        help="also time OpenSlide only reading the same patches on 2 threads")
    parser.add_argument("--encoder", default="lunit_vit_small_patch16_dino")
    parser.add_argument("--precision", default="float16", help="as --feature-precision (default: upstream's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="encoder device (cpu, cuda)")
    parser.add_argument("--decoder", default="auto", help="as --decoder")
    parser.add_argument("--allocators", default="cli_default,glibc_defaults",
                        help="pipeline runs, comma-separated, the first is the reference: " + ", ".join(
                            ["cli_default", "glibc_defaults", "small_footprint", "mmap_32mib", "arenas_2"]))
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the allocator configurations, alternated")
    parser.add_argument("--no-upstream", dest="upstream", action="store_false",
                        help="skip the upstream-style baseline (serial read_region, a DataLoader per batch, fp32 model)")
    parser.add_argument("--upstream-workers", type=int, default=4,
                        help="DataLoader workers of the upstream-style stage (upstream's --feature-num-workers, "
                             "default 4, forked per batch as upstream does; 0 = in the main process)")
    parser.add_argument("--emulate-no-avx512", action="store_true",
                        help="every measurement with torch, oneDNN and MKL kept to AVX2 (a CPU without AVX-512); "
                             "use --precision float32 there, as float16 means on such a CPU")
    parser.add_argument("--variant", action="append", default=[], type=parse_variant,
                        help="SECTION.KEY=VALUE[,...]: one more pipeline run (CLI default allocator) with these "
                             "settings (repeatable)")
    parser.add_argument("--baseline-tree", help="also run the pipeline from this checkout of an older commit, under the allocator "
                        "settings its CLI applied (the fixed 1 MiB threshold, two arenas): 'no slower than before' "
                        "measured in the same run")
    parser.add_argument("--baseline-allocators", default="small_footprint",
                        help="the allocator configuration the --baseline-tree runs under (as --allocators): "
                             "small_footprint is what commit 1ea700c's CLI applied, cli_default what this CLI does")
    parser.add_argument("--work", help="keep slides and weights in this folder (reused when present)")
    parser.add_argument("--override", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--trim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["pipeline", "encoder", "upstream", "openslide"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--patches", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        child(args)
        return
    names = args.allocators.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.work) if args.work else Path(tmp)
        slides = sorted((folder / "slides").glob("*.svs"))
        if len(slides) != args.slides or not (folder / f"{args.encoder}.safetensors").exists():
            slides = write_slides(folder / "slides", args.slides, args.size, args.tile)
            random_weights(args.encoder, folder)
        pipelines = alternate(args, folder, names)
        env, trim = allocators(emulated(args))["cli_default"]
        variants = [{"settings": v, **spawn(args, folder, "pipeline", env, out=f"out_v{i}", override=v, trim=trim)}
                    for i, v in enumerate(args.variant)]
        before = pipelines.pop(BEFORE, None)
        ours = pipelines[names[0]]
        alone = spawn(args, folder, "encoder", patches=ours["patches"])
        # the upstream-style stage reads the coordinates the reference run wrote
        upstream = spawn(args, folder, "upstream", out=f"out_{names[0]}") if args.upstream else None
        reading = spawn(args, folder, "openslide", out=f"out_{names[0]}") if args.openslide_read else None
    import torch

    wall, patches = ours["wall_s"], ours["patches"]
    line = {
        "bench": "process", "date": time.strftime("%Y-%m-%d"), "encoder": args.encoder, "precision": args.precision,
        "decoder": args.decoder, "slides": len(slides), "slide_px": [args.size, int(args.size * 0.75)], "tile_px": args.tile,
        "patches": patches, "reference": names[0], "rounds": args.rounds, "wall_s": wall,
        "encoder_alone_s": round(alone["wall_s"], 2), "ratio_wall_to_encoder": round(wall / alone["wall_s"], 3),
        "upstream_style_feature_stage_s": round(upstream["wall_s"], 2) if upstream else None,
        "speedup_vs_upstream_style": round(upstream["wall_s"] / wall, 2) if upstream else None,
        "peak_rss_mb": ours["peak_rss_mb"],
        "openslide_read_s": round(reading["wall_s"], 2) if reading else None,
        "wall_over_openslide_read": round(wall / reading["wall_s"], 3) if reading else None,
        "peak_rss_over_upstream_style": round(ours["peak_rss_mb"] / upstream["peak_rss_mb"], 3) if upstream else None,
        "job_peak_mb": ours["job_peak_mb"],
        "job_peak_over_upstream_style": round(ours["job_peak_mb"] / upstream["job_peak_mb"], 3) if upstream else None,
        "patches_per_s": round(patches / wall, 1), "slides_per_h": round(len(slides) / wall * 3600, 1),
        "pipelines": pipelines,
        "baseline_tree": {"commit": _commit(args.baseline_tree), "wall_s": before["wall_s"],
                          "allocators": args.baseline_allocators, "wall_s_runs": before["wall_s_runs"],
                          "peak_rss_mb": before["peak_rss_mb"], "job_peak_mb": before["job_peak_mb"],
                          "peak_rss_mb_runs": before["peak_rss_mb_runs"],
                          "wall_ours_over_before": round(wall / before["wall_s"], 3),
                          "wall_ours_over_before_paired": before["ours_over_before_paired"]} if before else None,
        "variants": [{"settings": v["settings"], "wall_s": round(v["wall_s"], 2),
                      "peak_rss_mb": v["peak_rss_mb"], "job_peak_mb": v["job_peak_mb"]} for v in variants] or None,
        "peak_rss_mb_encoder_alone": alone["peak_rss_mb"],
        "peak_rss_mb_upstream_style": upstream["peak_rss_mb"] if upstream else None,
        "job_peak_mb_encoder_alone": alone["job_peak_mb"],
        "job_peak_mb_upstream_style": upstream["job_peak_mb"] if upstream else None,
        "note": "each measurement in its own process: peak RSS is that process's own (slide writing excluded); "
                f"job_peak_mb adds its forked workers' private pages, sampled every {JOB_SAMPLE_S} s",
        "cpu_flags": cpu_flags(emulated(args)), "upstream_workers": args.upstream_workers,
        "machine": machine("torch", "timm", "imagecodecs", torch_threads=torch.get_num_threads()),
    }
    write_result("bench_process", line)


if __name__ == "__main__":
    sys.exit(main())
