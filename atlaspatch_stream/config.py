"""Frozen, validated settings: one dataclass per stage, gathered in `PipelineConfig`.

The loader applies CLI flag > `ATLASPATCH_*` environment > TOML file > default. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import orjson

from .errors import ConfigError

try:  # pragma: no cover - depends on the interpreter
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

Precision = Literal["float32", "float16", "bfloat16"]
SegmenterName = Literal["sam2", "otsu"]
WatchMode = Literal["auto", "events", "poll"]
LogFormat = Literal["text", "json"]
DecoderName = Literal["auto", "cpu", "dali", "nvimgcodec"]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class SourceConfig:
    """Which slides: input discovery and per-slide overrides."""

    recursive: bool = False
    mpp_csv: Path | None = None


@dataclass(frozen=True)
class OpenConfig:
    """The slide-opener pool."""

    max_open_slides: int = 200  # slides in flight from open to final write (each holds a handle + mask ≤ 4 MB)
    open_workers: int = 2  # threads opening slides and building thumbnails

    def __post_init__(self) -> None:
        _require(self.max_open_slides > 0, "--max-open-slides must be > 0")
        _require(self.open_workers > 0, "open_workers must be > 0")


@dataclass(frozen=True)
class SegmentConfig:
    """Tissue segmentation (upstream §3)."""

    segmenter: SegmenterName = "sam2"
    device: str = "cuda"
    seg_batch_size: int = 1
    seg_precision: Precision = "float32"
    seg_weights: Path | None = None
    thumbnail_power: float = 1.25
    thumbnail_max: int = 1024
    thumbnail_budget_mb: int = 512  # largest pyramid level read in one piece; above it, read in strips
    otsu_median: int = 7  # median blur kernel (odd, pixels at thumbnail resolution)
    otsu_close: int = 5  # morphological close kernel (pixels)
    otsu_min_saturation: int = 8  # the Otsu threshold is never below this saturation

    def __post_init__(self) -> None:
        _require(self.seg_batch_size > 0, "--seg-batch-size must be > 0")
        _require(self.segmenter in get_args(SegmenterName), f"unknown segmenter {self.segmenter!r}")
        _require(self.seg_precision in get_args(Precision), f"unknown precision {self.seg_precision!r}")
        _require(self.otsu_median % 2 == 1 and self.otsu_median > 0, "otsu_median must be a positive odd number")
        _require(self.otsu_close >= 0, "otsu_close must be >= 0")
        _require(self.thumbnail_max > 0 and self.thumbnail_power > 0, "thumbnail settings must be > 0")


@dataclass(frozen=True)
class PlanConfig:
    """Mask -> contours -> coordinates (upstream §3.5, §4)."""

    patch_size: int = 256
    step_size: int | None = None
    target_mag: int = 20
    tissue_thresh: float = 0.0
    white_thresh: int = 15
    black_thresh: int = 50
    fast_mode: bool = True
    hole_min_area: int = 16
    max_n_holes: int = 10
    workers: int | None = None  # threads planning coordinates (--patch-workers); None = CPU count, at most 8

    def __post_init__(self) -> None:
        _require(self.patch_size > 0, "--patch-size must be > 0")
        _require(self.step_size is None or self.step_size > 0, "--step-size must be > 0")
        _require(1 <= self.target_mag <= 120, "--target-mag must be in 1..120")
        _require(0.0 <= self.tissue_thresh <= 1.0, "--tissue-thresh must be in [0, 1]")
        _require(self.white_thresh > 0, "--white-thresh must be > 0")
        _require(self.black_thresh > 0, "--black-thresh must be > 0")
        _require(self.workers is None or self.workers > 0, "--patch-workers must be > 0")

    @property
    def threads(self) -> int:
        """Planning threads: `workers`, or the CPU count capped at 8."""
        return self.workers or min(8, os.cpu_count() or 1)

    @property
    def step(self) -> int:
        """The stride at target magnification."""
        return self.step_size or self.patch_size


@dataclass(frozen=True)
class ReadConfig:
    """Tile readers and decoders."""

    reader_threads: int = 4  # --feature-num-workers
    chunk_patches: int = 64  # patches per item sent downstream by a reader
    slides_in_parallel: int = 2  # slides read at once (each with its own reader threads and decoded tiles)
    decoder: DecoderName = "auto"  # --decoder: auto | cpu | dali | nvimgcodec
    decode_batch: int = 256  # tiles per GPU decode call
    hw_decoder_load: float = 0.65  # share of each GPU batch for the hardware JPEG engine

    def __post_init__(self) -> None:
        _require(self.reader_threads > 0, "reader threads must be > 0")
        _require(self.chunk_patches > 0, "chunk_patches must be > 0")
        _require(self.slides_in_parallel > 0, "slides_in_parallel must be > 0")
        _require(self.decoder in get_args(DecoderName),
                 f"unknown decoder {self.decoder!r} (one of {', '.join(get_args(DecoderName))})")
        _require(self.decode_batch > 0, "decode_batch must be > 0")
        _require(0.0 <= self.hw_decoder_load <= 1.0, "hw_decoder_load must be in [0, 1]")


@dataclass(frozen=True)
class EncodeConfig:
    """Patch encoders."""

    extractors: tuple[str, ...] = ()
    slide_encoders: tuple[str, ...] = ()  # embedded as each slide's patch features complete (stages/embed.py)
    device: str | None = None  # None -> SegmentConfig.device
    batch_size: int = 32
    precision: Precision = "float16"
    weights: tuple[tuple[str, Path], ...] = ()
    plugins: tuple[Path, ...] = ()
    compile: bool = False  # --compile: torch.compile the encoders (CUDA; minutes of warm-up per model)
    gpu_memory_budget: float = 0.5  # share of the feature GPU's free memory for rings, queues and batches
    allow_nonfinite: bool = False  # keep feature rows with NaN/Inf (counted in the H5 and the report); else fail

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, "--feature-batch-size must be > 0")
        _require(0.0 < self.gpu_memory_budget <= 1.0, "gpu_memory_budget must be in (0, 1]")
        _require(self.precision in get_args(Precision), f"unknown precision {self.precision!r}")
        _require(len(set(self.extractors)) == len(self.extractors), "duplicate feature extractors")


@dataclass(frozen=True)
class WriteConfig:
    """Outputs: H5 files, images, visualizations, reuse and locks."""

    output: Path = Path("output")
    write_batch: int = 8192
    skip_existing: bool = True
    save_images: bool = False
    visualize_grids: bool = False
    visualize_mask: bool = False
    visualize_contours: bool = False
    qc: bool = False  # --qc: save <out>/qc/thumbs/<stem>.jpg and .mask.png from the segmented thumbnail

    def __post_init__(self) -> None:
        _require(self.write_batch > 0, "--write-batch must be > 0")


@dataclass(frozen=True)
class QueueConfig:
    """Sizes of the bounded streams between stages (items; memory per item noted beside each)."""

    jobs: int = 64  # SlideJob: < 1 KB each
    thumbnails: int = 8  # Thumbnail: <= 1024*1024*3 B = 3 MB each
    masks: int = 8  # TissueMask: <= 1 MB each (+ its <= 3 MB thumbnail with --qc)
    plans: int = 8  # PatchPlan: N*20 B coords (1M patches = 20 MB)
    patches: int = 8  # PatchBatch: chunk_patches * P*P*3 B (64 * 256² * 3 = 12.6 MB)
    features: int = 8  # FeatureBatch: batch * D * 4 B (< 1 MB typical)
    results: int = 64  # SlideResult / SlideFailed: < 1 KB


@dataclass(frozen=True)
class RunConfig:
    """Run control."""

    drain_timeout_s: float = 30.0  # after the first Ctrl-C/SIGTERM, slides in flight get this long to finish

    def __post_init__(self) -> None:
        _require(self.drain_timeout_s >= 0, "--drain-timeout must be >= 0")


@dataclass(frozen=True)
class WatchConfig:
    """The daemon (`atlaspatch watch`): folder watching, the ledger, retries, shutdown and operations."""

    settle_s: float = 30.0  # a slide must be unchanged (size, mtime, ctime) this long before its completeness check
    settle_max_wait_s: float = 21600.0  # quiet but still incomplete this long: quarantined as "never completed"
    rescan_s: float = 60.0  # full rescan of the input folder (the truth; events are only hints)
    watch_mode: WatchMode = "auto"  # auto: poll on network filesystems (from /proc/mounts), events otherwise
    ignore: tuple[str, ...] = ()  # extra glob patterns never taken (matched on the name and the relative path)
    max_depth: int = 8  # sub-folder levels scanned below the input folder
    state_dir: Path | None = None  # ledger and status file; None = $XDG_STATE_HOME/atlaspatch/<hash of the output>
    max_attempts: int = 3  # slide errors before a slide is quarantined
    backoff_base_s: float = 60.0  # first retry delay ceiling; delays are full-jitter uniform(0, ceiling)
    backoff_factor: float = 4.0  # the ceiling grows by this factor per attempt
    backoff_max_s: float = 21600.0  # the ceiling never exceeds this
    probe_s: float = 60.0  # while intake is paused by a system error: seconds between output write probes
    drain_timeout_s: float = 120.0  # first SIGTERM: in-flight slides get this long to finish
    status_interval_s: float = 5.0  # status.json is replaced this often
    qc_report_s: float = 300.0  # the QC gallery <output>/qc/index.html is rebuilt this often when slides finished; 0 = off
    metrics: str | None = None  # "127.0.0.1:PORT" or "unix:PATH"; None = no listening socket at all
    pseudonymize: bool = False  # keyed hash instead of paths in H5 attributes, logs and metrics
    key_file: Path | None = None  # the site key for pseudonyms; None = <state_dir or OUTPUT/.atlaspatch>/pseudonym.key
    log_format: LogFormat = "text"  # "json": one JSON object per line for log shippers

    def __post_init__(self) -> None:
        _require(self.settle_s >= 0, "--settle-s must be >= 0")
        _require(self.settle_max_wait_s > self.settle_s, "settle_max_wait_s must be > settle_s")
        _require(self.rescan_s > 0, "--rescan-s must be > 0")
        _require(self.watch_mode in get_args(WatchMode), f"unknown --watch-mode {self.watch_mode!r}")
        _require(self.max_depth >= 0, "max_depth must be >= 0")
        _require(self.max_attempts >= 1, "--max-attempts must be >= 1")
        _require(self.backoff_base_s > 0, "backoff_base_s must be > 0")
        _require(self.backoff_factor >= 1, "backoff_factor must be >= 1")
        _require(self.backoff_max_s >= self.backoff_base_s, "backoff_max_s must be >= backoff_base_s")
        _require(self.probe_s > 0, "probe_s must be > 0")
        _require(self.drain_timeout_s >= 0, "--drain-timeout must be >= 0")
        _require(self.status_interval_s > 0, "status_interval_s must be > 0")
        _require(self.qc_report_s >= 0, "qc_report_s must be >= 0")
        _require(self.log_format in get_args(LogFormat), f"unknown --log-format {self.log_format!r}")
        _require(all(isinstance(g, str) and g for g in self.ignore), "--ignore patterns must be non-empty strings")
        if self.metrics is not None:
            from .daemon.ops.metrics import parse_bind

            parse_bind(self.metrics)  # raises ConfigError naming the refused address

    def state_path(self, output: Path) -> Path:
        """The state folder: `state_dir`, or a local one per output, `$XDG_STATE_HOME/atlaspatch/<hash>` (default
        `~/.local/state`), keyed by the resolved output path: SQLite's WAL never sits on the output share, and two
        daemons on one output never share a ledger unless told to."""
        if self.state_dir is not None:
            return self.state_dir
        xdg = os.environ.get("XDG_STATE_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
        key = hashlib.sha256(os.fsencode(Path(output).resolve())).hexdigest()[:16]
        return base / "atlaspatch" / key

    def key_path(self, output: Path) -> Path:
        """The pseudonym key file: `key_file`, or `<state_dir>/pseudonym.key`, or (no `state_dir`)
        `<output>/.atlaspatch/pseudonym.key`: the key names the outputs, so by default it stays with them and every
        daemon on one output uses the same one."""
        if self.key_file is not None:
            return self.key_file
        return (self.state_dir if self.state_dir is not None else Path(output) / ".atlaspatch") / "pseudonym.key"


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of one run."""

    source: SourceConfig = field(default_factory=SourceConfig)
    open: OpenConfig = field(default_factory=OpenConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    queues: QueueConfig = field(default_factory=QueueConfig)
    run: RunConfig = field(default_factory=RunConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)

    @property
    def feature_device(self) -> str:
        """The device encoders run on."""
        return self.encode.device or self.segment.device

    def replace(self, **sections: Any) -> PipelineConfig:
        """A copy with whole sections replaced."""
        return dataclasses.replace(self, **sections)


# The configuration's sections by name (`[plan]`, `ATLASPATCH_PLAN__...`): the fields of `PipelineConfig`.
SECTIONS: dict[str, type] = get_type_hints(PipelineConfig)


def geometry_fingerprint(config: PipelineConfig, segmenter_sha256: str | None) -> str:
    """A stable hash of the settings that shape coordinates, stored in every H5 to judge reuse."""
    plan = config.plan
    payload = {
        "patch_size": plan.patch_size,
        "step_size": plan.step,
        "target_mag": plan.target_mag,
        "tissue_thresh": plan.tissue_thresh,
        "fast_mode": plan.fast_mode,
        "white_thresh": plan.white_thresh if not plan.fast_mode else None,
        "black_thresh": plan.black_thresh if not plan.fast_mode else None,
        "segmenter": config.segment.segmenter,
        "segmenter_sha256": segmenter_sha256,
    }
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Loading: flag > env > TOML > default


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Turn a TOML or environment value into the field's type."""
    text = str(hint)
    if isinstance(value, str):
        if "bool" in text and "int" not in text:
            lowered = value.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        if hint is int or text.startswith("int"):
            try:
                return int(value)
            except ValueError as exc:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from exc
        if hint is float:
            try:
                return float(value)
            except ValueError as exc:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from exc
        if "tuple[tuple" in text:  # weights from the environment: "name=path,name2=path2"
            return _pairs(value, key)
        if "tuple" in text:
            return tuple(v for v in value.replace(",", " ").split() if v)
    if "Path" in text and isinstance(value, str) and "tuple" not in text:
        return Path(value)
    if "tuple" in text and isinstance(value, list):
        return tuple(value)
    if "tuple" in text and isinstance(value, Mapping):
        return tuple((k, Path(v)) for k, v in value.items())
    return value


def _pairs(value: str, key: str) -> tuple[tuple[str, Path], ...]:
    pairs = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        name, sep, path = part.partition("=")
        if not (sep and name.strip() and path.strip()):
            raise ConfigError(f"{key}: expected name=path pairs, got {part!r}")
        pairs.append((name.strip(), Path(path.strip())))
    return tuple(pairs)


def _from_env(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """`ATLASPATCH_<SECTION>__<KEY>=value` -> {section: {key: value}}."""
    found: dict[str, dict[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith("ATLASPATCH_") or "__" not in name:
            continue
        section, _, key = name[len("ATLASPATCH_") :].lower().partition("__")
        found.setdefault(section, {})[key] = value
    return found


def _build(merged: Mapping[str, Mapping[str, Any]]) -> PipelineConfig:
    sections: dict[str, Any] = {}
    for section, values in merged.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown configuration section [{section}]")
        cls = SECTIONS[section]
        types = get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in types:
                raise ConfigError(f"unknown configuration key {section}.{key}")
            kwargs[key] = _coerce(value, types[key], f"{section}.{key}")
        try:
            sections[section] = cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"[{section}]: {exc}") from exc
    return PipelineConfig(**sections)


def read_toml(path: Path) -> dict[str, dict[str, Any]]:
    """Read a TOML configuration file into {section: {key: value}}."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
    return data


def load_config(
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    toml_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """Build a `PipelineConfig`: CLI flags > `ATLASPATCH_*` environment > TOML file > defaults.

    Args:
        flags: values given on the command line, by section (None values are ignored).
        toml_path: a TOML file with the same sections (`--config`).
        environ: the environment to read (defaults to `os.environ`).

    Raises:
        ConfigError: on unknown sections or keys and on invalid values.
    """
    layers: list[Mapping[str, Mapping[str, Any]]] = []
    if toml_path is not None:
        layers.append(read_toml(toml_path))
    layers.append(_from_env(os.environ if environ is None else environ))
    if flags:
        layers.append({s: {k: v for k, v in vals.items() if v is not None} for s, vals in flags.items()})
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return _build(merged)
