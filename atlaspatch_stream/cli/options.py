"""Upstream's click options (reference §1.1–1.3) plus ours, and their mapping onto config sections."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..config import PipelineConfig, load_config
from ..errors import ConfigError

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _apply(options: list[Decorator]) -> Decorator:
    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return wrap


INPUT_OPTIONS: list[Decorator] = [
    click.argument("wsi_path", type=click.Path(exists=True, path_type=Path)),
    click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Output root folder."),
    click.option("--device", default=None, show_default="cuda",
                 help="Segmentation device: cpu, cuda or cuda:N (plain cuda falls back to CPU without a GPU)."),
    click.option("--seg-batch-size", type=click.IntRange(min=1), default=None, show_default="1",
                 help="Thumbnails per segmentation call."),
    click.option("--recursive", is_flag=True, help="Recurse into subfolders."),
    click.option("--mpp-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="CSV with columns wsi,mpp; its mpp wins over slide metadata (also for magnification)."),
    click.option("--verbose", "-v", is_flag=True, help="Debug logging (the progress bar stays)."),
    click.option("--segmenter", type=click.Choice(["sam2", "otsu"]), default=None,
                 help="Tissue segmenter: sam2 (upstream's fine-tuned SAM2.1, default) or otsu (weight-free)."),
    click.option("--seg-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="Local SAM2 checkpoint (model.pth) instead of the Hugging Face cache."),
    click.option("--seg-precision", type=click.Choice(["float32", "bfloat16", "float16"], case_sensitive=False),
                 default=None, help="SAM2 precision (float32 = upstream parity)."),
    click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 default=None, help="TOML configuration (flags > ATLASPATCH_* env > file > defaults)."),
    click.option("--drain-timeout", type=click.FloatRange(min=0), default=None, show_default="30",
                 help="Seconds slides in flight get to finish after the first Ctrl-C/SIGTERM."),
]

COMMON_OPTIONS: list[Decorator] = [
    click.option("--patch-size", type=int, required=True, help="Patch edge in pixels at the target magnification."),
    click.option("--step-size", type=int, default=None, help="Stride at the target magnification [patch-size]."),
    click.option("--target-mag", type=click.IntRange(1, 120), required=True, help="Target magnification."),
    click.option("--tissue-thresh", type=float, default=None, show_default="0.0",
                 help="Minimum tissue contour area as a fraction of the thumbnail area."),
    click.option("--white-thresh", type=int, default=None, show_default="15",
                 help="Saturation threshold of the white filter (--no-fast-mode only)."),
    click.option("--black-thresh", type=int, default=None, show_default="50",
                 help="Grey threshold of the black filter (--no-fast-mode only)."),
    click.option("--write-batch", type=int, default=None, show_default="8192", help="H5 chunk rows for coords."),
    click.option("--patch-workers", type=int, default=None, help="Threads planning coordinates [cpu count]."),
    click.option("--max-open-slides", type=int, default=None, show_default="200", help="Slides in flight at once."),
    click.option("--fast-mode/--no-fast-mode", default=None, show_default="True",
                 help="Fast mode emits coordinates without reading pixels (no black/white filters)."),
    click.option("--save-images", is_flag=True, help="Write every patch as a PNG under <out>/images/<stem>/."),
    click.option("--visualize-grids", is_flag=True, help="<out>/visualization/<stem>.png"),
    click.option("--visualize-mask", is_flag=True, help="<out>/visualization/<stem>_mask.png and _mask_bw.png"),
    click.option("--visualize-contours", is_flag=True, help="<out>/visualization/<stem>_contours.png"),
    click.option("--qc", is_flag=True, help="Save a small JPEG thumbnail and tissue mask per slide under "
                                            "<out>/qc/thumbs/ for `atlaspatch report` (no second read)."),
    click.option("--skip-existing/--force", default=None, show_default="True",
                 help="Skip or reuse slides whose output exists (--force re-segments and overwrites)."),
]

def _extractors(required: bool) -> Decorator:
    return click.option("--feature-extractors", required=required, default=None,
                        help="Encoder names separated by commas and/or spaces (see `atlaspatch encoders`)"
                             + ("." if required else "; without it, coordinates only."))


FEATURE_OPTIONS: list[Decorator] = [
    _extractors(True),
    click.option("--feature-device", default=None, help="Encoder device [--device]."),
    click.option("--feature-batch-size", type=int, default=None, show_default="32", help="Patches per forward call."),
    click.option("--feature-num-workers", type=click.IntRange(min=0), default=None, show_default="4",
                 help="Tile reader/decoder threads."),
    click.option("--feature-precision", type=click.Choice(["float32", "float16", "bfloat16"], case_sensitive=False),
                 default=None, show_default="float16",
                 help="float32 exact; float16 = fp16 autocast on CUDA, on CPU bf16 where native else fp32; bfloat16 = bf16."),
    click.option("--allow-nonfinite", is_flag=True, default=None,
                 help="Keep feature rows with NaN/Inf (counted in the H5 and the run report) instead of failing."),
    click.option("--decoder", type=click.Choice(["auto", "cpu", "dali", "nvimgcodec"]), default=None,
                 show_default="auto",
                 help="Tile decoder: auto = dali with CUDA and DALI, else nvimgcodec with CUDA, else cpu (imagecodecs)."),
    click.option("--compile", "compile_encoders", is_flag=True, default=None,
                 help="torch.compile the encoders (CUDA; slow first batch). Off by default."),
    click.option("--feature-plugin", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="Python file registering custom encoders (repeatable)."),
    click.option("--weights", "weights", multiple=True, metavar="NAME=PATH",
                 help="Local weights for an encoder (.pth/.bin/.safetensors; repeatable)."),
]

WATCH_OPTIONS: list[Decorator] = [
    click.option("--settle-s", type=click.FloatRange(min=0), default=None, show_default="30",
                 help="Seconds a slide must stay unchanged (size, mtime) before its completeness check."),
    click.option("--rescan-s", type=click.FloatRange(min=0, min_open=True), default=None, show_default="60",
                 help="Seconds between full rescans of INPUT (the truth; filesystem events are hints)."),
    click.option("--watch-mode", type=click.Choice(["auto", "events", "poll"]), default=None, show_default="auto",
                 help="auto polls on network filesystems (NFS, SMB/CIFS, FUSE...), where events do not arrive."),
    click.option("--ignore", "ignore", multiple=True, metavar="GLOB",
                 help="Names never taken, besides hidden files, *.part, *.tmp, *.partial and ~* (repeatable)."),
    click.option("--once", is_flag=True, help="Process every slide ready now, then exit (cron, tests)."),
    click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Folder of the ledger and status file, on a local disk, one per daemon "
                      "[$XDG_STATE_HOME/atlaspatch/<hash of OUTPUT>]."),
    click.option("--max-attempts", type=click.IntRange(min=1), default=None, show_default="3",
                 help="Slide errors before a slide is quarantined (gave up after N attempts)."),
    click.option("--retry-quarantined", is_flag=True, help="Give every quarantined slide a new set of attempts."),
    click.option("--metrics", default=None, metavar="127.0.0.1:PORT|unix:PATH",
                 help="Serve Prometheus metrics there (loopback or a Unix socket only); off by default."),
    click.option("--log-format", type=click.Choice(["text", "json"]), default=None, show_default="text",
                 help="One line per slide transition, as text or JSON objects."),
    click.option("--pseudonymize", is_flag=True,
                 help="Record a keyed hash instead of paths and file names in H5s, logs, report and metrics."),
    click.option("--allow-root", is_flag=True, help="Run as root (refused by default)."),
]

input_options = _apply(INPUT_OPTIONS)
common_options = _apply(COMMON_OPTIONS)
feature_options = _apply(FEATURE_OPTIONS)
watch_options = _apply([_extractors(False), *FEATURE_OPTIONS[1:], *WATCH_OPTIONS])


def parse_feature_list(text: str) -> tuple[str, ...]:
    """Upstream's rules: commas and/or spaces, lowercased, order kept; duplicates rejected."""
    names = tuple(n.strip().lower() for n in text.replace(",", " ").split() if n.strip())
    if not names:
        raise click.BadParameter("no feature extractor given", param_hint="--feature-extractors")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise click.BadParameter(f"duplicate extractor(s): {', '.join(dups)}", param_hint="--feature-extractors")
    return names


def parse_weights(items: tuple[str, ...]) -> tuple[tuple[str, Path], ...]:
    """`NAME=PATH` pairs; the file must exist."""
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH, got {item!r}", param_hint="--weights")
        if not Path(path).is_file():
            raise click.BadParameter(f"{path}: no such file", param_hint="--weights")
        pairs.append((name.strip().lower(), Path(path)))
    return tuple(pairs)


def build_config(params: dict[str, Any], *, features: bool) -> PipelineConfig:
    """Map click parameters onto config sections (None = not given, so env/TOML/defaults apply)."""
    p = params
    flags: dict[str, dict[str, Any]] = {
        "source": {"recursive": p.get("recursive") or None, "mpp_csv": p.get("mpp_csv")},
        "segment": {"device": p.get("device"), "seg_batch_size": p.get("seg_batch_size"),
                    "segmenter": p.get("segmenter"), "seg_weights": p.get("seg_weights"),
                    "seg_precision": (p.get("seg_precision") or "").lower() or None},
        "write": {"output": p.get("output")},
        "run": {"drain_timeout_s": p.get("drain_timeout")},
    }
    if "patch_size" in p:
        flags["plan"] = {k: p.get(k) for k in ("patch_size", "step_size", "target_mag", "tissue_thresh",
                                                "white_thresh", "black_thresh", "fast_mode")}
        flags["plan"]["workers"] = p.get("patch_workers")
        flags["open"] = {"max_open_slides": p.get("max_open_slides")}
        flags["write"].update({k: p.get(k) for k in ("write_batch", "skip_existing")})
        # plain flags: only an explicit flag overrides the environment or the TOML file
        flags["write"].update({k: p.get(k) or None for k in ("save_images", "visualize_grids", "visualize_mask",
                                                             "visualize_contours", "qc")})
    if features:
        flags["encode"] = {
            "extractors": parse_feature_list(p["feature_extractors"]) if p.get("feature_extractors") else None,
            "device": p.get("feature_device"),
            "batch_size": p.get("feature_batch_size"),
            "precision": (p.get("feature_precision") or "").lower() or None,
            "plugins": tuple(p.get("feature_plugin") or ()),
            "weights": parse_weights(tuple(p.get("weights") or ())),
            "compile": p.get("compile_encoders") or None,
            "allow_nonfinite": p.get("allow_nonfinite") or None,
        }
        workers = p.get("feature_num_workers")
        flags["read"] = {"reader_threads": max(1, workers) if workers is not None else None,
                         "decoder": p.get("decoder")}
    if "settle_s" in p:
        flags["watch"] = {k: p.get(k) for k in ("settle_s", "rescan_s", "watch_mode", "state_dir", "max_attempts",
                                                "metrics", "log_format")}
        flags["watch"].update({"ignore": tuple(p.get("ignore") or ()) or None, "pseudonymize": p.get("pseudonymize")
                               or None, "drain_timeout_s": flags["run"].pop("drain_timeout_s")})
    try:
        return load_config(flags, toml_path=p.get("config_file"))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
