"""The one prepared device check of the GPU path (gpu.md §5): run once on the GPU machine, under 9 minutes.

On the device (after `python perf/build_gpu_carry.py` here; carry=[".whl", ".gpucheck"]):

    S=${TMPDIR:-/tmp}/site; python3 -m pip install -q --no-index --no-deps --no-compile --target $S .whl/*.whl \\
      && python3 -c "import sys, zipfile; zipfile.ZipFile('.whl/purepy.zip').extractall(sys.argv[1])" $S \\
      && PYTHONPATH=$S:$PWD python3 perf/gpu_check.py --deadline 480          (run with timeout_s=560)

Here, first (same code paths on the CPU, small sizes, CUDA-only variants reported as skipped):

    PYTHONPATH=$PWD python perf/gpu_check.py --cpu-dry-run

Sections (each in try/except, each skipped when the deadline no longer allows it; one JSON line per result, flushed
at once, to <out>/gpu_check.jsonl; <out> is $OUT on the device, perf/results/ here):
 0 env        versions, device properties, `nvidia-smi -q` decoder lines, `nvidia-smi dmon` in the background
 1 colour     CMU-1 (Aperio RGB JPEG) and JPEG 2000 tiles through nvImageCodec's CPU backend (must equal the hashes
              made with imagecodecs), our nvimgcodec backend on the GPU (SYCC), raw routes (sRGB+APP14, sRGB raw, the
              hardware decoder alone), torchvision's GPU decoder; synthetic YCbCr 4:4:4 / 4:2:2 / 4:2:0 with and
              without fancy upsampling; the backend's start-up probes; DALI when installed
 2 resize     the torch cutter/resizer on the device vs cv2 (exact at 2× and 4×, ≤ 1 otherwise) and vs itself on CPU;
              the encoders' Pillow-exact resize on the device vs CPU
 3 decode     tiles/s: our backend at batch 64/256/1024 and 1/2/4 threads, nvImageCodec default vs hardware-only vs
              hybrid-only, torchvision batched, the CPU backend; CPU seconds per tile; device memory growth; JPEG 2000
 4 copies     pinned vs pageable H2D / D2H
 5 bare       resnet50 (B 512) and ViT-L/16 (uni_v1, B 256), fp16 autocast, channels-last CNN: img/s, TFLOP/s;
              torch.compile variants when time allows
 6 numerics   CPU fp32 vs GPU fp32 (TF32 off) vs GPU fp16 features: cosine and relative L2
 7 sam2       SAM2 masks on the device vs the CPU at float32 (random seeded checkpoint)
 8 e2e        a 40× tiled TIFF written on the device -> TileOnceReader (nvimgcodec on the GPU, torch cut 512 -> 256)
              -> EncoderCudaStreams (ring, events, pinned features): patches/s and the ratio to section 5's bare rate
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".gpucheck"
GFLOP = {"resnet50": 8.2, "uni_v1": 119.3}  # per 224² image (torch FlopCounter, gpu.md §3.1)


class Check:
    """Deadline, output lines and the device under test."""

    def __init__(self, out: Path, deadline: float, dry: bool) -> None:
        import torch

        self.dry = dry
        self.device = "cpu" if dry else "cuda:0"
        # fp16 autocast on the device; the dry run keeps float32 (CPU autocast would be bf16, slow on most CPUs)
        self.precision = "float32" if dry else "float16"
        self.cuda = not dry and torch.cuda.is_available()
        self.started = time.perf_counter()
        self.deadline = deadline
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        name = "gpu_check_cpu_dry_run.jsonl" if dry else "gpu_check.jsonl"
        self._fh = open(out / name, "a")  # noqa: SIM115 - kept open for the whole run, flushed per line
        self.summary: list[tuple[str, str]] = []
        self.cache: dict[str, Any] = {}

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - (time.perf_counter() - self.started)

    def emit(self, section: str, name: str, **fields: Any) -> None:
        """One JSON line, flushed now."""
        import orjson

        line = {"section": section, "name": name, "t": round(time.perf_counter() - self.started, 1), **fields}
        self._fh.write(orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY, default=str).decode() + "\n")
        self._fh.flush()

    def note(self, label: str, value: Any) -> None:
        """A line of the closing summary table."""
        self.summary.append((label, str(value)))

    def run(self, section: str, fn: Callable[[Check], None], needs: float) -> None:
        """Run one section unless fewer than `needs` seconds remain; errors are recorded, never fatal."""
        if self.left() < needs:
            self.emit(section, "skipped", reason=f"{self.left():.0f} s left, needs about {needs:.0f} s")
            self.note(section, "skipped (deadline)")
            return
        begun = time.perf_counter()
        try:
            fn(self)
            self.emit(section, "done", seconds=round(time.perf_counter() - begun, 1))
        except Exception as exc:  # noqa: BLE001 - a device-specific failure must not stop the other sections
            self.emit(section, "error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-3000:])
            self.note(section, f"ERROR {type(exc).__name__}: {str(exc)[:80]}")

    def sync(self) -> None:
        """Device-wide synchronize (benchmark timing only; the pipeline never does this)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def _diff(got: np.ndarray | None, want: np.ndarray) -> dict[str, Any]:
    if got is None:
        return {"decoded": False}
    d = np.abs(np.asarray(got).astype(np.int16) - want.astype(np.int16))
    return {"decoded": True, "max_abs": int(d.max()), "mean_abs": round(float(d.mean()), 4),
            "mean_rgb": np.asarray(got).reshape(-1, 3).mean(0).round(2).tolist()}


def _many(gots: list[Any], wants: list[np.ndarray]) -> dict[str, Any]:
    stats = [_diff(None if g is None else _host(g), w) for g, w in zip(gots, wants, strict=True)]
    ok = [s for s in stats if s["decoded"]]
    if not ok:
        return {"decoded": 0, "of": len(stats)}
    return {"decoded": len(ok), "of": len(stats), "max_abs": max(s["max_abs"] for s in ok),
            "mean_abs": round(float(np.mean([s["mean_abs"] for s in ok])), 4),
            "mean_rgb": np.mean([s["mean_rgb"] for s in ok], axis=0).round(2).tolist()}


def _host(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "cpu") and hasattr(x, "numpy"):
        return x.cpu().numpy()
    return np.asarray(x.cpu())  # nvImageCodec Image


def _sha(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def level_tiles(path: Path) -> tuple[Any, list[bytes]]:
    """The level-0 `TilePageMeta` (via tifffile, no tiffslide on the device) and every stored tile."""
    import tifffile

    from atlaspatch_stream.backends.tiles import page_meta, read_raw

    with tifffile.TiffFile(path) as tf:
        meta = page_meta(str(path), 0, 1.0, tf.pages[0])
    fd = os.open(path, os.O_RDONLY)
    try:
        raws = [read_raw(fd, meta, t) for t in range(meta.grid.count)]
    finally:
        os.close(fd)
    return meta, [r for r in raws if r is not None]


# -- 0 -------------------------------------------------------------------------------------------------------------


def env(c: Check) -> None:
    """Versions and device facts; dmon in the background; abort-early check of nvImageCodec."""
    import torch

    facts: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                             "cuda_available": torch.cuda.is_available(), "dry_run": c.dry}
    for mod in ("torchvision", "timm", "cv2", "tifffile", "PIL", "nvidia.nvimgcodec", "nvidia.dali", "sam2"):
        with contextlib.suppress(Exception):
            m = __import__(mod, fromlist=["__version__"])
            facts[mod] = getattr(m, "__version__", "present")
    if c.cuda:
        p = torch.cuda.get_device_properties(0)
        facts |= {"gpu": p.name, "gpu_mem_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count}
        smi = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True).stdout
        (c.out / "env.txt").write_text(smi)
        facts["smi_decoder_lines"] = [ln.strip() for ln in smi.splitlines()
                                      if any(k in ln for k in ("Decoder", "JPG", "Driver Version", "CUDA Version"))]
        c.cache["dmon"] = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"],
                                           stdout=open(c.out / "dmon.txt", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    c.emit("env", "facts", **facts)
    c.note("device", facts.get("gpu", "cpu (dry run)"))
    from atlaspatch_stream.backends.decoders.nvimgcodec import NvImageCodecDecoder

    dec = NvImageCodecDecoder(c.device, batch_size=64)
    dec.warm_up()  # builds decoders, runs the start-up probes (a tiny decode per family)
    c.cache["probes"] = dec.statistics()["probes"]
    c.emit("env", "nvimgcodec_ready", probes=c.cache["probes"])
    dec.close()


# -- 1 -------------------------------------------------------------------------------------------------------------


def colour(c: Check) -> None:
    """Pixels and colour of every decoder route against the CPU references."""
    import orjson
    from nvidia import nvimgcodec as nv

    from atlaspatch_stream.backends.decoders.base import full_jpeg, with_app14_rgb
    from atlaspatch_stream.backends.decoders.nvimgcodec import NvImageCodecDecoder

    refs = orjson.loads((DATA / "refs.json").read_bytes())
    cpu = NvImageCodecDecoder("cpu", batch_size=256)
    gpu = NvImageCodecDecoder(c.device, batch_size=256)
    for label, fname, key in (("cmu1", "CMU-1-Small-Region.svs", "cmu1"), ("j2k", "j2k_33005.svs", "j2k")):
        meta, raws = level_tiles(DATA / fname)
        want = cpu.decode_batch(raws, meta).pixels
        exact = [_sha(p) for p in want] == refs[key]["sha256"]
        c.emit("colour", f"{label}_cpu_backend_vs_imagecodecs_hashes", bit_exact=exact, tiles=len(want))
        c.note(f"{label}: nvImageCodec CPU == imagecodecs", exact)
        c.cache[f"{label}_tiles"] = (meta, raws, want)
        got = gpu.decode_batch(raws, meta).pixels
        stats = _many(got, want)
        c.emit("colour", f"{label}_backend_on_device", **stats, ref_mean_rgb=np.mean(refs[key]["mean_rgb"], 0))
        c.note(f"{label}: our nvimgcodec backend on {c.device}", f"max {stats.get('max_abs')} mean {stats.get('mean_abs')}")
    meta, raws, want = c.cache["cmu1_tiles"]
    merged = [full_jpeg(r, meta) for r in raws]
    app14 = [with_app14_rgb(m) for m in merged]
    dev = nv.NVIMGCODEC_DEVICE_CPU_ONLY if not c.cuda else 0
    cpu_only = [nv.Backend(nv.BackendKind.CPU_ONLY)]
    gpu_all = cpu_only if not c.cuda else [nv.Backend(nv.BackendKind.HW_GPU_ONLY), nv.Backend(nv.BackendKind.GPU_ONLY),
                                           nv.Backend(nv.BackendKind.HYBRID_CPU_GPU)]
    hw_only = cpu_only if not c.cuda else [nv.Backend(nv.BackendKind.HW_GPU_ONLY)]
    sycc = nv.DecodeParams(color_spec=nv.ColorSpec.SYCC, apply_exif_orientation=False)
    srgb = nv.DecodeParams(color_spec=nv.ColorSpec.SRGB, apply_exif_orientation=False)
    routes = {"sycc_raw_all_backends": (gpu_all, merged, sycc), "srgb_app14_all_backends": (gpu_all, app14, srgb),
              "srgb_raw_all_backends_expect_wrong": (gpu_all, merged, srgb), "sycc_raw_hw_only": (hw_only, merged, sycc),
              "srgb_app14_hw_only": (hw_only, app14, srgb)}
    for name, (backends, streams, params) in routes.items():
        decoder = nv.Decoder(device_id=dev, backends=backends)
        images = decoder.decode(streams, params=params)
        c.emit("colour", f"cmu1_route_{name}", **_many(images, want))
    for name, streams in (("torchvision_app14", app14), ("torchvision_raw_expect_wrong", merged)):
        c.emit("colour", f"cmu1_{name}", **_torchvision_decode(c, streams, want))
    _ycbcr_routes(c, want)
    c.emit("colour", "startup_probes", probes=c.cache.get("probes"))
    _dali_colour(c, meta, raws, want)


def _torchvision_decode(c: Check, streams: list[bytes], want: list[np.ndarray]) -> dict[str, Any]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    out = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda" if c.cuda else "cpu")
    return _many([o.permute(1, 2, 0) for o in out], want)


def _cmu_pixels(c: Check) -> np.ndarray:
    """CMU-1 level 0 assembled from its reference tiles (tissue pixels for synthetic encodes)."""
    if "cmu_image" not in c.cache:
        meta, _, want = c.cache["cmu1_tiles"]
        g = meta.grid
        img = np.zeros((g.down * g.tile_h, g.across * g.tile_w, 3), np.uint8)
        for t, px in enumerate(want):
            x, y = g.origin(t)
            img[y : y + g.tile_h, x : x + g.tile_w] = px
        c.cache["cmu_image"] = img[: g.height, : g.width]
    return c.cache["cmu_image"]


def _ycbcr_tiles(c: Check, sampling: int, n: int, size: int = 256, quality: int = 85) -> list[bytes]:
    import cv2

    img = _cmu_pixels(c)
    rng = np.random.default_rng(sampling + n)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        tile = np.ascontiguousarray(img[y : y + size, x : x + size, ::-1])  # cv2 encodes BGR
        ok, enc = cv2.imencode(".jpg", tile, [cv2.IMWRITE_JPEG_QUALITY, quality,
                                              cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling])
        assert ok
        out.append(enc.tobytes())
    return out


SAMPLINGS = {"444": 0x111111, "422": 0x211111, "420": 0x221111}


def _ycbcr_routes(c: Check, _want: list[np.ndarray]) -> None:
    from nvidia import nvimgcodec as nv

    srgb = nv.DecodeParams(color_spec=nv.ColorSpec.SRGB, apply_exif_orientation=False)
    cpu = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.BackendKind.CPU_ONLY)])
    for label, sampling in SAMPLINGS.items():
        streams = _ycbcr_tiles(c, sampling, 16 if c.dry else 64)
        want = [_host(i) for i in cpu.decode(streams, params=srgb)]
        for fancy in (0, 1):
            dev = 0 if c.cuda else nv.NVIMGCODEC_DEVICE_CPU_ONLY
            backends = None if c.cuda else [nv.Backend(nv.BackendKind.CPU_ONLY)]
            decoder = nv.Decoder(device_id=dev, backends=backends, options=f":fancy_upsampling={fancy}")
            c.emit("colour", f"ycbcr_{label}_fancy{fancy}", **_many(decoder.decode(streams, params=srgb), want))


def _dali_colour(c: Check, meta: Any, raws: list[bytes], want: list[np.ndarray]) -> None:
    try:
        from atlaspatch_stream.backends.decoders.dali import DaliDecoder

        dali = DaliDecoder(c.device, batch_size=64)
    except Exception as exc:  # noqa: BLE001 - DALI is not carried to the device (gpu.md §5.6)
        c.emit("colour", "dali", skipped=f"{type(exc).__name__}: {exc}")
        return
    got = dali.decode_batch(raws, meta).pixels
    c.emit("colour", "cmu1_dali_app14", **_many(got, want), probes=dali.statistics()["probes"])
    dali.close()


# -- 2 -------------------------------------------------------------------------------------------------------------


def resize(c: Check) -> None:
    """Cut/resize parity on the device vs cv2 and vs the same torch code on the CPU."""
    import cv2
    import torch

    from atlaspatch_stream.backends.encoders.runtime import pil_like_resize
    from atlaspatch_stream.backends.encoders.spec import Preprocess
    from atlaspatch_stream.backends.patches import cut_patches, resize_linear

    img = _cmu_pixels(c)
    rng = np.random.default_rng(1)
    for read, size in ((512, 256), (1024, 256), (448, 224), (512, 224), (300, 256), (224, 256)):
        n = 8 if c.dry else 32
        ys, xs = rng.integers(0, img.shape[0] - read, n), rng.integers(0, img.shape[1] - read, n)
        crops = np.stack([img[y : y + read, x : x + read] for y, x in zip(ys, xs, strict=True)])
        want = np.stack([cv2.resize(p, (size, size)) for p in crops])
        on_dev = resize_linear(torch.from_numpy(crops).to(c.device), size).cpu().numpy()
        on_cpu = resize_linear(torch.from_numpy(crops), size).numpy()
        d = np.abs(on_dev.astype(int) - want)
        c.emit("resize", f"linear_{read}_to_{size}", max_abs_vs_cv2=int(d.max()),
               share_differing=round(float((d > 0).mean()), 5), device_equals_cpu=bool(np.array_equal(on_dev, on_cpu)))
    meta, _, tiles = c.cache["cmu1_tiles"]
    decoded = dict(enumerate(tiles))
    rects = np.stack([rng.integers(-200, meta.grid.width, 48), rng.integers(-200, meta.grid.height, 48),
                      np.full(48, 512), np.full(48, 512)], 1)
    dev_cut = cut_patches(decoded, meta.grid, rects, 256, c.device).cpu().numpy()
    cpu_cut = cut_patches(decoded, meta.grid, rects, 256, "cpu").numpy()
    c.emit("resize", "cut_512_to_256_device_equals_cpu", equal=bool(np.array_equal(dev_cut, cpu_cut)))
    pre = Preprocess(resize=224, crop=224, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bicubic")
    x = torch.from_numpy(dev_cut[:8]).permute(0, 3, 1, 2).float().div(255.0)
    dev_pil = pil_like_resize(x.to(c.device), (224, 224), pre).cpu()
    cpu_pil = pil_like_resize(x, (224, 224), pre)
    from PIL import Image

    pil = np.stack([np.asarray(Image.fromarray(p).resize((224, 224), Image.BICUBIC)) for p in dev_cut[:8]])
    ours = (dev_pil * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    c.emit("resize", "pil_bicubic_256_to_224", device_equals_cpu=bool(torch.equal(dev_pil, cpu_pil)),
           max_abs_vs_pil=int(np.abs(ours.astype(int) - pil).max()))
    c.note("cut/resize on device == CPU torch", bool(np.array_equal(dev_cut, cpu_cut)))


# -- 3 -------------------------------------------------------------------------------------------------------------


def _timed(c: Check, fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median wall seconds of `fn` and process CPU seconds per call."""
    fn()
    c.sync()
    walls, cpu0 = [], sum(os.times()[:2])
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        c.sync()
        walls.append(time.perf_counter() - t)
    return statistics.median(walls), (sum(os.times()[:2]) - cpu0) / repeat


def decode(c: Check) -> None:
    """Decode throughput through our backend and the raw nvImageCodec backends."""
    import torch
    from nvidia import nvimgcodec as nv

    from atlaspatch_stream.backends.decoders.nvimgcodec import NvImageCodecDecoder
    from atlaspatch_stream.backends.decoders.probe import probe_meta

    distinct = _ycbcr_tiles(c, SAMPLINGS["420"], 32 if c.dry else 128)
    total = 256 if c.dry else 8192
    tiles = (distinct * (total // len(distinct) + 1))[:total]
    meta = probe_meta("jpeg_ycbcr")
    free0 = torch.cuda.mem_get_info()[0] if c.cuda else 0
    rep = 1 if c.dry else 3
    for batch in ((64,) if c.dry else (64, 256, 1024)):
        for threads in ((1, 2) if c.dry else (1, 2, 4)):
            dec = NvImageCodecDecoder(c.device, batch_size=batch, engines=threads)
            dec.warm_up()
            chunks = [tiles[k : k + batch] for k in range(0, len(tiles), batch)]

            def run(dec: NvImageCodecDecoder = dec, chunks: list[list[bytes]] = chunks, threads: int = threads) -> None:
                def worker(part: list[list[bytes]]) -> None:
                    for ch in part:
                        dec.decode_batch(ch, meta)

                ts = [threading.Thread(target=worker, args=(chunks[i::threads],)) for i in range(threads)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()

            wall, cpu = _timed(c, run, rep)
            c.emit("decode", f"backend_b{batch}_t{threads}", tiles_per_s=round(total / wall),
                   gpix_per_s=round(total * 256 * 256 / wall / 1e9, 2), cpu_s_per_1k_tiles=round(cpu / total * 1e3, 3))
            dec.close()
            if c.left() < 200:
                break
    srgb = nv.DecodeParams(color_spec=nv.ColorSpec.SRGB, apply_exif_orientation=False)
    variants: dict[str, Any] = {"cpu_backend": (nv.NVIMGCODEC_DEVICE_CPU_ONLY, [nv.Backend(nv.BackendKind.CPU_ONLY)])}
    if c.cuda:
        variants |= {"default": (0, None), "hw_only": (0, [nv.Backend(nv.BackendKind.HW_GPU_ONLY)]),
                     "hybrid_only": (0, [nv.Backend(nv.BackendKind.HYBRID_CPU_GPU)])}
    for name, (dev, backends) in variants.items():
        threads = 14 if name == "cpu_backend" and c.cuda else 0
        decoder = nv.Decoder(device_id=dev, backends=backends, max_num_cpu_threads=threads)
        batches = [tiles[k : k + 256] for k in range(0, len(tiles), 256)]
        results: list[Any] = []
        wall, cpu = _timed(c, lambda d=decoder, b=batches, r=results: r.append([d.decode(x, params=srgb) for x in b]), rep)
        decoded = sum(i is not None for i in results[-1][0])
        c.emit("decode", f"nvimgcodec_{name}", tiles_per_s=round(total / wall), decoded_of_256=decoded,
               cpu_s_per_1k_tiles=round(cpu / total * 1e3, 3))
    c.emit("decode", "torchvision_batched", **_torchvision_rate(c, tiles, rep))
    if c.cuda:
        c.emit("decode", "device_memory_growth_mib", value=round((free0 - torch.cuda.mem_get_info()[0]) / 2**20))
    jmeta, jraws, _ = c.cache["j2k_tiles"]
    jdec = NvImageCodecDecoder(c.device, batch_size=64)
    wall, _cpu = _timed(c, lambda: jdec.decode_batch(jraws, jmeta), rep)
    c.emit("decode", "j2k_backend", tiles_per_s=round(len(jraws) / wall), tile=jmeta.grid.tile_w)


def _torchvision_rate(c: Check, tiles: list[bytes], rep: int) -> dict[str, Any]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in tiles]
    batches = [data[k : k + 256] for k in range(0, len(data), 256)]
    device = "cuda" if c.cuda else "cpu"
    wall, cpu = _timed(c, lambda: [decode_jpeg(b, mode=ImageReadMode.RGB, device=device) for b in batches], rep)
    return {"tiles_per_s": round(len(tiles) / wall), "cpu_s_per_1k_tiles": round(cpu / len(tiles) * 1e3, 3)}


# -- 4 -------------------------------------------------------------------------------------------------------------


def copies(c: Check) -> None:
    """Pinned vs pageable host <-> device bandwidth."""
    import torch

    if not c.cuda:
        c.emit("copies", "skipped", reason="CUDA only")
        return
    size = 256 << 20
    dev = torch.empty(size, dtype=torch.uint8, device=c.device)
    for pinned in (True, False):
        host = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        h2d, _ = _timed(c, lambda h=host: dev.copy_(h, non_blocking=True), 5)
        d2h, _ = _timed(c, lambda h=host: h.copy_(dev, non_blocking=True), 5)
        c.emit("copies", "pinned" if pinned else "pageable", h2d_gb_s=round(size / h2d / 1e9, 1),
               d2h_gb_s=round(size / d2h / 1e9, 1))


# -- 5 -------------------------------------------------------------------------------------------------------------


def _encoder(c: Check, name: str, device: str, precision: str, model: Any = None, compile: bool = False) -> Any:
    import torch

    from atlaspatch_stream.backends.encoders.registry import get_spec
    from atlaspatch_stream.backends.encoders.runtime import TorchEncoder

    spec = get_spec(name)
    if model is None:
        torch.manual_seed(0)
        model = spec.build()
    enc = TorchEncoder(spec, device=device, precision=precision, model=model, compile=compile)
    enc.warm_up()
    return enc


def bare(c: Check) -> None:
    """Bare encoder forward rates (model input already on the device, fp16 autocast)."""
    import torch

    for name, batch in (("resnet50", 512), ("uni_v1", 256)):
        for compiled in (False, True):
            if compiled and (c.dry or c.left() < 200):
                c.emit("bare", f"{name}_compiled", skipped="dry run (CPU inductor)" if c.dry else "deadline")
                continue
            b = 2 if c.dry else batch
            enc = _encoder(c, name, c.device, c.precision, compile=compiled)
            x = enc.model_input(torch.randint(0, 256, (b, 224, 224, 3), dtype=torch.uint8, device=c.device))

            def fwd(enc: Any = enc, x: Any = x) -> None:
                with torch.inference_mode(), enc._autocast():
                    enc._forward(x)

            wall, _ = _timed(c, fwd, 1 if c.dry else 10)
            rate = b / wall
            key = f"{name}_compiled" if compiled else name
            c.cache[f"bare_{key}"] = rate
            c.emit("bare", key, batch=b, img_per_s=round(rate, 1), tflops=round(rate * GFLOP[name] / 1e3, 1))
            c.note(f"bare {key} img/s (B={b})", round(rate, 1))
            enc.close()


# -- 6 -------------------------------------------------------------------------------------------------------------


def numerics(c: Check) -> None:
    """Features on the device vs the CPU: fp32 (TF32 off) and fp16 autocast."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    meta, _, tiles = c.cache["cmu1_tiles"]
    from atlaspatch_stream.backends.patches import cut_patches

    rng = np.random.default_rng(3)
    n = 4 if c.dry else 32
    rects = np.stack([rng.integers(0, meta.grid.width - 512, n), rng.integers(0, meta.grid.height - 512, n),
                      np.full(n, 512), np.full(n, 512)], 1)
    pixels = cut_patches(dict(enumerate(tiles)), meta.grid, rects, 256, "cpu").numpy()
    for name in ("resnet50", "uni_v1"):
        ref_enc = _encoder(c, name, "cpu", "float32")
        ref = ref_enc.encode(pixels)
        for precision in dict.fromkeys(("float32", c.precision)):
            enc = _encoder(c, name, c.device, precision, model=ref_enc._model)
            got = enc.encode(pixels)
            cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
            rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            c.emit("numerics", f"{name}_{precision}_vs_cpu_fp32", cos_min=round(float(cos.min()), 6),
                   cos_mean=round(float(cos.mean()), 6), rel_l2=rel)
            c.note(f"{name} {precision} on {c.device} vs CPU fp32 cos_min", round(float(cos.min()), 6))


# -- 7 -------------------------------------------------------------------------------------------------------------


def sam2(c: Check) -> None:
    """SAM2 masks on the device equal the CPU masks at float32."""
    import tempfile

    from atlaspatch_stream.backends.segment_sam2 import Sam2Segmenter
    from atlaspatch_stream.testing.sam2_weights import write_random_sam2_checkpoint
    from atlaspatch_stream.testing.synthetic import draw_tissue

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_sam2_checkpoint(Path(tmp) / "model.pth")
        images = [draw_tissue(640, 480, seed=i)[0] for i in range(2)]
        masks = {}
        for device in dict.fromkeys(("cpu", c.device)):
            seg = Sam2Segmenter(device, "float32", ckpt, batch_size=2)
            seg.warm_up()
            masks[device] = seg.segment(images)
            seg.close()
    agree = [float(np.mean(a == b)) for a, b in zip(masks["cpu"], masks[c.device], strict=True)]
    c.emit("sam2", "masks_device_vs_cpu", equal_share=agree, identical=all(a == 1.0 for a in agree))
    c.note("SAM2 masks device == CPU", all(a == 1.0 for a in agree))


# -- 8 -------------------------------------------------------------------------------------------------------------


def _write_tiff(path: Path, tiles: list[bytes], across: int, down: int) -> Path:
    """A one-level 40× tiled TIFF of pre-encoded YCbCr 4:2:0 JPEG tiles (256²), written with tifffile."""
    import tifffile

    stream = (tiles[i % len(tiles)] for i in range(across * down))
    with tifffile.TiffWriter(path) as tw:
        tw.write(stream, shape=(down * 256, across * 256, 3), dtype=np.uint8, tile=(256, 256), compression=7,
                 photometric="ycbcr", subsampling=(2, 2), metadata=None)
    return path


def e2e(c: Check) -> None:
    """Reader (GPU decode, device cut) -> encoder streams -> pinned features, for ~20 s per encoder."""
    import tempfile

    import tifffile

    from atlaspatch_stream.backends.cuda_streams import EncoderCudaStreams, device_ops
    from atlaspatch_stream.backends.decoders.nvimgcodec import NvImageCodecDecoder
    from atlaspatch_stream.backends.readers import TileOnceReader
    from atlaspatch_stream.backends.tiles import page_meta

    seconds = 2.0 if c.dry else 20.0
    with tempfile.TemporaryDirectory() as tmp:
        side = 8 if c.dry else 64
        path = _write_tiff(Path(tmp) / "e2e.tif", _ycbcr_tiles(c, SAMPLINGS["420"], 64), side, side)
        with tifffile.TiffFile(path) as tf:
            meta = page_meta(str(path), 0, 1.0, tf.pages[0])
        xs, ys = np.meshgrid(np.arange(0, side * 256 - 511, 512), np.arange(0, side * 256 - 511, 512))
        coords = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, 512), np.full(xs.size, 512),
                           np.zeros(xs.size, int)], 1)
        decoder = NvImageCodecDecoder(c.device, batch_size=256, engines=2)
        decoder.warm_up()
        for name, batch in (("resnet50", 512), ("uni_v1", 256)):
            b = 4 if c.dry else batch
            enc = _encoder(c, name, c.device, c.precision)
            runner = EncoderCudaStreams([enc], device_ops(c.device), batch_size=b, slots=3)
            reader = TileOnceReader(threads=4, decoder=decoder, device_output=True)
            done, started, pending = 0, time.perf_counter(), []
            while time.perf_counter() - started < seconds:
                with contextlib.closing(reader.iter_level(meta, coords, 256, b, slide="e2e")) as chunks:
                    for _rows, pixels in chunks:
                        if len(pending) == runner.slots:
                            done += next(iter(runner.collect(pending.pop(0)).values())).shape[0]
                        pending.append(runner.submit(pixels))
                        if time.perf_counter() - started > seconds:
                            break
            done += sum(next(iter(runner.collect(t).values())).shape[0] for t in pending)
            wall = time.perf_counter() - started
            rate = done / wall
            bare_rate = c.cache.get(f"bare_{name}")
            c.emit("e2e", name, batch=b, patches=done, patches_per_s=round(rate, 1),
                   ratio_to_bare=round(rate / bare_rate, 3) if bare_rate else None,
                   tiles_per_patch=round(decoder.statistics()["tiles"] / max(1, done), 2),
                   decoder=decoder.statistics(), reader=reader.statistics())
            c.note(f"e2e {name} patches/s (ratio to bare)",
                   f"{rate:.1f} ({rate / bare_rate:.2f})" if bare_rate else f"{rate:.1f}")
            runner.close()
            enc.close()
        decoder.close()


SECTIONS: list[tuple[str, Callable[[Check], None], float]] = [
    ("env", env, 5), ("colour", colour, 30), ("resize", resize, 15), ("decode", decode, 60), ("copies", copies, 5),
    ("bare", bare, 60), ("numerics", numerics, 30), ("sam2", sam2, 30), ("e2e", e2e, 50),
]


def main() -> int:
    """Run every section within the deadline; print the summary table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--cpu-dry-run", action="store_true", help="same code paths on the CPU, small sizes")
    parser.add_argument("--out", type=Path, default=None, help="results folder [$OUT or perf/results]")
    args = parser.parse_args()
    if not (DATA / "refs.json").exists():
        print("missing .gpucheck/: run `python perf/build_gpu_carry.py` first and carry .gpucheck and .whl")
        return 2
    out = args.out or Path(os.environ.get("OUT") or ROOT / "perf" / "results")
    c = Check(out, args.deadline, args.cpu_dry_run)
    if not c.dry and not c.cuda:
        print("no CUDA device visible: use --cpu-dry-run")
        return 2
    c.emit("start", "run", deadline=args.deadline, dry=c.dry, date=time.strftime("%Y-%m-%d %H:%M"))
    for name, fn, needs in SECTIONS:
        c.run(name, fn, needs)
        if name == "env" and "probes" not in c.cache:
            print("nvImageCodec did not start on the device: see the env error line; stopping early")
            break
    dmon = c.cache.get("dmon")
    if dmon is not None:
        dmon.terminate()
    width = max(len(label) for label, _ in c.summary) if c.summary else 0
    print(f"gpu_check ({'CPU dry run' if c.dry else c.device}) in {time.perf_counter() - c.started:.0f} s")
    for label, value in c.summary:
        print(f"  {label:<{width}}  {value}")
    errors = [label for label, value in c.summary if value.startswith("ERROR")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
