"""Frozen, validated settings: one dataclass per stage, gathered in `PipelineConfig`.

The loader applies CLI flag > `ATLASPATCH_*` environment > TOML file > default. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import orjson

from .cpu import usable_cores
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


# The bounds a `_setting` field may declare, each with its test.
_BOUNDS: dict[str, Callable[[Any], bool]] = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in 1..120": lambda v: 1 <= v <= 120,
}


def _setting(default: Any, bound: str | None = None, flag: str | None = None) -> Any:
    """A field whose value (unless None) must be `bound`, one of `_BOUNDS`; `flag` names it in messages (default:
    the field's name)."""
    return field(default=default, metadata={"bound": bound, "flag": flag})


@dataclass(frozen=True)
class _Section:
    """A configuration section, checked once it is built: a `Literal` field must hold one of its values, a
    `_setting` field its bound (subclasses check the rest)."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            bound = f.metadata.get("bound")
            label = f.metadata.get("flag") or f.name
            if bound is not None and value is not None:
                _require(_BOUNDS[bound](value), f"{label} must be {bound}")
            if get_origin(hints[f.name]) is Literal:
                choices = get_args(hints[f.name])
                _require(value in choices, f"unknown {label} {value!r} (one of {', '.join(choices)})")


@dataclass(frozen=True)
class SourceConfig(_Section):
    """Which slides: input discovery and per-slide overrides."""

    recursive: bool = False
    mpp_csv: Path | None = None


@dataclass(frozen=True)
class OpenConfig(_Section):
    """The slide-opener pool."""

    # slides in flight from open to final write (each holds a handle + mask ≤ 4 MB)
    max_open_slides: int = _setting(200, "> 0", "--max-open-slides")
    open_workers: int = _setting(2, "> 0")  # threads opening slides and building thumbnails


@dataclass(frozen=True)
class SegmentConfig(_Section):
    """Tissue segmentation (upstream §3)."""

    segmenter: SegmenterName = "sam2"
    device: str = "cuda"
    seg_batch_size: int = _setting(1, "> 0", "--seg-batch-size")
    seg_precision: Precision = _setting("float32", flag="precision")
    seg_weights: Path | None = None
    thumbnail_power: float = 1.25
    thumbnail_max: int = 1024
    thumbnail_budget_mb: int = 512  # largest pyramid level read in one piece; above it, read in strips
    otsu_median: int = 7  # median blur kernel (odd, pixels at thumbnail resolution)
    otsu_close: int = _setting(5, ">= 0")  # morphological close kernel (pixels)
    otsu_min_saturation: int = 8  # the Otsu threshold is never below this saturation

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.otsu_median % 2 == 1 and self.otsu_median > 0, "otsu_median must be a positive odd number")
        _require(self.thumbnail_max > 0 and self.thumbnail_power > 0, "thumbnail settings must be > 0")


@dataclass(frozen=True)
class PlanConfig(_Section):
    """Mask -> contours -> coordinates (upstream §3.5, §4)."""

    patch_size: int = _setting(256, "> 0", "--patch-size")
    step_size: int | None = _setting(None, "> 0", "--step-size")
    target_mag: int = _setting(20, "in 1..120", "--target-mag")
    tissue_thresh: float = _setting(0.0, "in [0, 1]", "--tissue-thresh")
    white_thresh: int = _setting(15, "> 0", "--white-thresh")
    black_thresh: int = _setting(50, "> 0", "--black-thresh")
    fast_mode: bool = True
    hole_min_area: int = 16
    max_n_holes: int = 10
    # threads planning coordinates; None = the usable cores, at most 8
    workers: int | None = _setting(None, "> 0", "--patch-workers")

    @property
    def threads(self) -> int:
        """Planning threads: `workers`, or the usable cores capped at 8."""
        return self.workers or min(8, usable_cores())

    @property
    def step(self) -> int:
        """The stride at target magnification."""
        return self.step_size or self.patch_size


@dataclass(frozen=True)
class ReadConfig(_Section):
    """Tile readers and decoders."""

    reader_threads: int = _setting(4, "> 0", "reader threads")  # --feature-num-workers
    chunk_patches: int = _setting(64, "> 0")  # patches per item sent downstream by a reader
    # slides read at once (each with its own reader threads and decoded tiles)
    slides_in_parallel: int = _setting(2, "> 0")
    decoder: DecoderName = "auto"  # --decoder: auto | cpu | dali | nvimgcodec
    decode_batch: int = _setting(256, "> 0")  # tiles per GPU decode call
    hw_decoder_load: float = _setting(0.65, "in [0, 1]")  # share of each GPU batch for the hardware JPEG engine


@dataclass(frozen=True)
class EncodeConfig(_Section):
    """Patch encoders."""

    extractors: tuple[str, ...] = ()
    slide_encoders: tuple[str, ...] = ()  # embedded as each slide's patch features complete (stages/embed.py)
    device: str | None = None  # None -> SegmentConfig.device
    batch_size: int = _setting(32, "> 0", "--feature-batch-size")
    precision: Precision = "float16"
    weights: tuple[tuple[str, Path], ...] = ()
    plugins: tuple[Path, ...] = ()
    compile: bool = False  # --compile: torch.compile the encoders (CUDA; minutes of warm-up per model)
    # share of the feature GPU's free memory for rings, queues and batches
    gpu_memory_budget: float = _setting(0.5, "in (0, 1]")
    allow_nonfinite: bool = False  # keep feature rows with NaN/Inf (counted in the H5 and the report); else fail

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(len(set(self.extractors)) == len(self.extractors), "duplicate feature extractors")


@dataclass(frozen=True)
class WriteConfig(_Section):
    """Outputs: H5 files, images, visualizations, reuse and locks."""

    output: Path = Path("output")
    write_batch: int = _setting(8192, "> 0", "--write-batch")
    skip_existing: bool = True
    save_images: bool = False
    visualize_grids: bool = False
    visualize_mask: bool = False
    visualize_contours: bool = False
    qc: bool = False  # --qc: save <out>/qc/thumbs/<stem>.jpg and .mask.png from the segmented thumbnail


@dataclass(frozen=True)
class QueueConfig(_Section):
    """Sizes of the bounded streams between stages (items; memory per item noted beside each), and the byte
    ceiling of the one that carries pixels."""

    jobs: int = 64  # SlideJob: < 1 KB each
    thumbnails: int = 8  # Thumbnail: <= 1024*1024*3 B = 3 MB each
    masks: int = 8  # TissueMask: <= 1 MB each (+ its <= 3 MB thumbnail with --qc)
    plans: int = 8  # PatchPlan: N*20 B coords (1M patches = 20 MB)
    patches: int = 8  # PatchBatch: chunk_patches * P*P*3 B (64 * 256² * 3 = 12.6 MB)
    features: int = 8  # FeatureBatch: batch * D * 4 B (< 1 MB typical)
    results: int = 64  # SlideResult / SlideFailed: < 1 KB
    # the patches stream's ceiling in MB: large patches queue fewer chunks (`PipelineConfig.patch_queue`)
    patches_mb: float = _setting(256.0, "> 0")


@dataclass(frozen=True)
class RunConfig(_Section):
    """Run control."""

    # after the first Ctrl-C/SIGTERM, slides in flight get this long to finish
    drain_timeout_s: float = _setting(30.0, ">= 0", "--drain-timeout")


@dataclass(frozen=True)
class WatchConfig(_Section):
    """The daemon (`atlaspatch watch`): folder watching, the ledger, retries, shutdown and operations."""

    # a slide must be unchanged (size, mtime, ctime) this long before its completeness check
    settle_s: float = _setting(30.0, ">= 0", "--settle-s")
    settle_max_wait_s: float = 21600.0  # quiet but still incomplete this long: quarantined as "never completed"
    # full rescan of the input folder (the truth; events are only hints)
    rescan_s: float = _setting(60.0, "> 0", "--rescan-s")
    watch_mode: WatchMode = _setting("auto", flag="--watch-mode")  # auto: poll on network filesystems (from /proc/mounts), events otherwise
    ignore: tuple[str, ...] = ()  # extra glob patterns never taken (matched on the name and the relative path)
    max_depth: int = _setting(8, ">= 0")  # sub-folder levels scanned below the input folder
    state_dir: Path | None = None  # ledger and status file; None = $XDG_STATE_HOME/atlaspatch/<hash of the output>
    max_attempts: int = _setting(3, ">= 1", "--max-attempts")  # slide errors before a slide is quarantined
    # first retry delay ceiling; delays are full-jitter uniform(0, ceiling)
    backoff_base_s: float = _setting(60.0, "> 0")
    backoff_factor: float = _setting(4.0, ">= 1")  # the ceiling grows by this factor per attempt
    backoff_max_s: float = 21600.0  # the ceiling never exceeds this
    # while intake is paused by a system error: seconds between output write probes
    probe_s: float = _setting(60.0, "> 0")
    # first SIGTERM: in-flight slides get this long to finish
    drain_timeout_s: float = _setting(120.0, ">= 0", "--drain-timeout")
    status_interval_s: float = _setting(5.0, "> 0")  # status.json is replaced this often
    # the QC gallery <output>/qc/index.html is rebuilt this often when slides finished; 0 = off
    qc_report_s: float = _setting(300.0, ">= 0")
    metrics: str | None = None  # "127.0.0.1:PORT" or "unix:PATH"; None = no listening socket at all
    pseudonymize: bool = False  # keyed hash instead of paths in H5 attributes, logs and metrics
    key_file: Path | None = None  # the site key for pseudonyms; None = <state_dir or OUTPUT/.atlaspatch>/pseudonym.key
    log_format: LogFormat = _setting("text", flag="--log-format")  # "json": one JSON object per line for log shippers

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.settle_max_wait_s > self.settle_s, "settle_max_wait_s must be > settle_s")
        _require(self.backoff_max_s >= self.backoff_base_s, "backoff_max_s must be >= backoff_base_s")
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

    @property
    def chunk_bytes(self) -> int:
        """The most bytes of one reader chunk: `read.chunk_patches` RGB patches of `plan.patch_size`."""
        return self.read.chunk_patches * self.plan.patch_size**2 * 3

    @property
    def patch_queue(self) -> int:
        """Chunks the `patches` stream holds: `queues.patches`, fewer where their bytes would pass
        `queues.patches_mb` (at least one)."""
        return max(1, min(self.queues.patches, int(self.queues.patches_mb * 2**20) // self.chunk_bytes))

    def replace(self, **sections: Any) -> PipelineConfig:
        """A copy with whole sections replaced."""
        return dataclasses.replace(self, **sections)

    def sized_for_cpu(self, cores: int | None = None) -> PipelineConfig:
        """Read no further ahead than encoders on the CPU can use; the configured sizes stay the ceilings.

        The encoder shares the cores with reading and is the slower of the two, so decoded tiles and patches read far
        ahead only hold memory (perf/profile_memory.py: they were 250 MB of the four-slide resnet18 job's peak):
        - patch chunks of at most one encoder batch (`read.chunk_patches`): a slide then holds the decoded tiles of
          about two batches (the chunk being cut and the one decoded ahead);
        - one slide read at a time when its reader threads alone cover the `cores` (default: this machine's);
        - a `patches` stream of two batches.
        """
        read, batch = self.read, self.encode.batch_size
        chunk = min(read.chunk_patches, batch)
        covered = read.reader_threads >= (cores or usable_cores())
        return self.replace(
            read=dataclasses.replace(read, chunk_patches=chunk,
                                     slides_in_parallel=1 if covered else read.slides_in_parallel),
            queues=dataclasses.replace(self.queues, patches=min(self.queues.patches, max(2, -(-2 * batch // chunk)))))


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
