"""The configuration loader: flag > ATLASPATCH_<SECTION>__<KEY> env > TOML > default; unknown keys and bad values fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from atlaspatch_stream.config import (
    EncodeConfig,
    OpenConfig,
    PipelineConfig,
    PlanConfig,
    ReadConfig,
    SegmentConfig,
    WriteConfig,
    geometry_fingerprint,
    load_config,
)
from atlaspatch_stream.errors import ConfigError


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_layer() -> None:
    """No flags, no env, no file: every section is its dataclass default."""
    config = load_config(environ={})
    assert config == PipelineConfig()
    assert config.plan.step == config.plan.patch_size


def test_precedence_flag_over_env_over_toml_over_default(tmp_path: Path) -> None:
    """One key set in all three layers takes the flag; a key set in env and TOML takes env; TOML beats defaults."""
    toml = _toml(tmp_path, "[plan]\npatch_size = 512\ntarget_mag = 10\nstep_size = 100\n")
    environ = {"ATLASPATCH_PLAN__PATCH_SIZE": "384", "ATLASPATCH_PLAN__TARGET_MAG": "40"}
    flags = {"plan": {"patch_size": 128, "target_mag": None}}
    config = load_config(flags, toml, environ)
    assert config.plan.patch_size == 128  # flag
    assert config.plan.target_mag == 40  # env (flag was None: not given)
    assert config.plan.step_size == 100  # TOML
    assert config.plan.tissue_thresh == PlanConfig().tissue_thresh  # default


def test_env_values_are_coerced_to_field_types() -> None:
    """Environment strings become bools, ints, floats, paths and tuples according to each field's type."""
    environ = {
        "ATLASPATCH_WRITE__SKIP_EXISTING": "false",
        "ATLASPATCH_WRITE__OUTPUT": "/data/out",
        "ATLASPATCH_PLAN__TISSUE_THRESH": "0.25",
        "ATLASPATCH_PLAN__STEP_SIZE": "128",
        "ATLASPATCH_PLAN__FAST_MODE": "no",
        "ATLASPATCH_ENCODE__EXTRACTORS": "resnet50, uni_v1",
        "ATLASPATCH_OPEN__MAX_OPEN_SLIDES": "7",
        "UNRELATED": "1",
        "ATLASPATCH_NO_SECTION": "ignored",  # no "__": not a config variable
    }
    config = load_config(environ=environ)
    assert config.write.skip_existing is False
    assert config.write.output == Path("/data/out")
    assert config.plan.tissue_thresh == pytest.approx(0.25)
    assert config.plan.step_size == 128
    assert config.plan.fast_mode is False
    assert config.encode.extractors == ("resnet50", "uni_v1")
    assert config.open.max_open_slides == 7


def test_toml_types_paths_and_weights(tmp_path: Path) -> None:
    """TOML lists become tuples, path strings Paths, and a weights table (name = path) pairs."""
    toml = _toml(
        tmp_path,
        '[encode]\nextractors = ["a", "b"]\n[encode.weights]\na = "/w/a.safetensors"\n'
        '[write]\noutput = "out"\nsave_images = true\n',
    )
    config = load_config(toml_path=toml, environ={})
    assert config.encode.extractors == ("a", "b")
    assert config.encode.weights == (("a", Path("/w/a.safetensors")),)
    assert config.write.output == Path("out")
    assert config.write.save_images is True


@pytest.mark.parametrize(
    ("toml", "environ", "needle"),
    [
        ("[nope]\nx = 1\n", {}, "unknown configuration section [nope]"),
        ("[plan]\npatch_sise = 1\n", {}, "unknown configuration key plan.patch_sise"),
        ("", {"ATLASPATCH_PLAN__BOGUS": "1"}, "plan.bogus"),
        ("", {"ATLASPATCH_BOGUS__KEY": "1"}, "[bogus]"),
        ("", {"ATLASPATCH_PLAN__PATCH_SIZE": "big"}, "expected an integer"),
        ("", {"ATLASPATCH_WRITE__SKIP_EXISTING": "maybe"}, "expected a boolean"),
        ("", {"ATLASPATCH_PLAN__TISSUE_THRESH": "half"}, "expected a number"),
        ("patch_size = 3\n", {}, "must be a [section]"),
    ],
)
def test_unknown_sections_keys_and_bad_values_fail(tmp_path: Path, toml: str, environ: dict[str, str], needle: str) -> None:
    """Each mistake raises ConfigError with a message naming the section, key or expected type."""
    with pytest.raises(ConfigError) as info:
        load_config(toml_path=_toml(tmp_path, toml), environ=environ)
    assert needle in str(info.value)


def test_unreadable_toml_is_a_config_error(tmp_path: Path) -> None:
    """A missing file and a syntax error both raise ConfigError naming the file."""
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(toml_path=tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(toml_path=_toml(tmp_path, "[plan\n"), environ={})


@pytest.mark.parametrize(
    ("factory", "needle"),
    [
        (lambda: OpenConfig(max_open_slides=0), "--max-open-slides"),
        (lambda: SegmentConfig(seg_batch_size=0), "--seg-batch-size"),
        (lambda: SegmentConfig(segmenter="magic"), "unknown segmenter"),  # type: ignore[arg-type]
        (lambda: SegmentConfig(seg_precision="int8"), "unknown precision"),  # type: ignore[arg-type]
        (lambda: SegmentConfig(otsu_median=4), "otsu_median"),
        (lambda: PlanConfig(patch_size=0), "--patch-size"),
        (lambda: PlanConfig(step_size=0), "--step-size"),
        (lambda: PlanConfig(target_mag=0), "--target-mag"),
        (lambda: PlanConfig(tissue_thresh=1.5), "--tissue-thresh"),
        (lambda: ReadConfig(reader_threads=0), "reader threads"),
        (lambda: EncodeConfig(batch_size=0), "--feature-batch-size"),
        (lambda: EncodeConfig(extractors=("a", "a")), "duplicate"),
        (lambda: WriteConfig(write_batch=0), "--write-batch"),
    ],
)
def test_validation_errors(factory: object, needle: str) -> None:
    """Invalid values are refused at construction with a message naming the flag."""
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        factory()  # type: ignore[operator]


def test_validation_applies_to_loaded_values(tmp_path: Path) -> None:
    """A value of the wrong type or range from TOML fails as ConfigError, not TypeError."""
    with pytest.raises(ConfigError, match="--patch-size"):
        load_config(toml_path=_toml(tmp_path, "[plan]\npatch_size = -1\n"), environ={})
    with pytest.raises(ConfigError):
        load_config(toml_path=_toml(tmp_path, "[plan]\npatch_size = [1]\n"), environ={})


def test_fingerprint_tracks_geometry_only() -> None:
    """Geometry settings change the fingerprint; output folder, batch sizes and thresholds unused in fast mode do not."""
    base = PipelineConfig()
    same = base.replace(write=WriteConfig(output=Path("elsewhere")), plan=PlanConfig(white_thresh=99))
    assert geometry_fingerprint(base, None) == geometry_fingerprint(same, None)
    assert geometry_fingerprint(base, None) != geometry_fingerprint(base.replace(plan=PlanConfig(patch_size=224)), None)
    assert geometry_fingerprint(base, None) != geometry_fingerprint(base.replace(plan=PlanConfig(step_size=128)), None)
    assert geometry_fingerprint(base, None) != geometry_fingerprint(base, "abc")
    slow = base.replace(plan=PlanConfig(fast_mode=False))
    assert geometry_fingerprint(slow, None) != geometry_fingerprint(
        base.replace(plan=PlanConfig(fast_mode=False, white_thresh=99)), None
    )


def test_env_weights_are_name_path_pairs() -> None:
    """`ATLASPATCH_ENCODE__WEIGHTS=a=/w/a.pt,b=/w/b` gives (name, Path) pairs; a bare word is an error."""
    config = load_config(environ={"ATLASPATCH_ENCODE__WEIGHTS": "a=/w/a.pt, b=/w/b"})
    assert config.encode.weights == (("a", Path("/w/a.pt")), ("b", Path("/w/b")))
    with pytest.raises(ConfigError, match="name=path"):
        load_config(environ={"ATLASPATCH_ENCODE__WEIGHTS": "a.pt"})


def test_shipped_default_toml_lists_the_defaults() -> None:
    """configs/default.toml loads and equals the built-in defaults (it documents every option with its default)."""
    from atlaspatch_stream.config import PipelineConfig

    root = Path(__file__).resolve().parents[2]
    assert load_config(toml_path=root / "configs" / "default.toml", environ={}) == PipelineConfig()
    cpu = load_config(toml_path=root / "configs" / "cpu.toml", environ={})
    assert cpu.segment.device == "cpu" and cpu.encode.device == "cpu"


def test_sized_for_cpu_reads_no_further_ahead_than_the_encoder_uses() -> None:
    """On the CPU: chunks of at most one batch, a patches stream of two batches, one slide at a time when its reader
    threads cover the cores; configured sizes below those stay (they are the ceilings)."""
    config = load_config({"encode": {"batch_size": 32}, "read": {"chunk_patches": 64, "reader_threads": 4,
                                                                 "slides_in_parallel": 2}}, environ={})
    two_cores = config.sized_for_cpu(cores=2)
    assert (two_cores.read.chunk_patches, two_cores.read.slides_in_parallel, two_cores.queues.patches) == (32, 1, 2)
    many_cores = config.sized_for_cpu(cores=16)
    assert (many_cores.read.chunk_patches, many_cores.read.slides_in_parallel) == (32, 2)
    small = load_config({"encode": {"batch_size": 32}, "read": {"chunk_patches": 8},
                         "queues": {"patches": 3}}, environ={}).sized_for_cpu(cores=16)
    assert (small.read.chunk_patches, small.queues.patches) == (8, 3)  # 8 chunks make two batches; 3 is the ceiling
    assert config.sized_for_cpu(cores=2).sized_for_cpu(cores=2) == two_cores


def test_the_patches_stream_is_bounded_by_bytes_as_well_as_chunks() -> None:
    """`queues.patches_mb` caps what the patches stream can hold: 224-px chunks of 64 fit eight times in 256 MB, so
    `queues.patches` binds; 1024-px chunks (192 MiB each) fit once; a budget under one chunk still queues one."""
    small = load_config({"plan": {"patch_size": 224}, "read": {"chunk_patches": 64}}, environ={})
    assert small.chunk_bytes == 64 * 224 * 224 * 3 and small.patch_queue == small.queues.patches == 8
    large = load_config({"plan": {"patch_size": 1024}, "read": {"chunk_patches": 64}}, environ={})
    assert large.patch_queue == 1
    mid = load_config({"plan": {"patch_size": 512}, "read": {"chunk_patches": 64}}, environ={})
    assert mid.patch_queue == 5 and mid.patch_queue * mid.chunk_bytes <= 256 * 2**20 < 6 * mid.chunk_bytes
    tight = load_config({"queues": {"patches_mb": 40}, "plan": {"patch_size": 512}, "read": {"chunk_patches": 64}},
                        environ={})
    assert tight.patch_queue == 1
    with pytest.raises(ConfigError, match="patches_mb"):
        load_config({"queues": {"patches_mb": 0}}, environ={})


_CORES_PROBE = """
import dataclasses
from atlaspatch_stream.config import PipelineConfig, PlanConfig
from atlaspatch_stream.cpu import usable_cores
from atlaspatch_stream.report import machine
config = PipelineConfig()
two_readers = config.replace(read=dataclasses.replace(config.read, reader_threads=1, slides_in_parallel=2))
print(usable_cores(), PlanConfig().threads, two_readers.sized_for_cpu().read.slides_in_parallel,
      machine()["usable_cores"])
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and at least two usable cores")
def test_sizes_follow_the_cpu_affinity_not_the_machine() -> None:
    """A process pinned to one core (as `taskset` or a SLURM cpuset pins it) plans on one thread, reads one slide at a
    time with one reader thread, and reports one usable core; unpinned, the same code sees every core it may use."""
    def probe(cores: set[int] | None) -> list[int]:
        pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        done = subprocess.run([sys.executable, "-c", _CORES_PROBE], capture_output=True, text=True, check=True,
                              preexec_fn=pin)
        return [int(v) for v in done.stdout.split()]

    everything = len(os.sched_getaffinity(0))
    assert probe({min(os.sched_getaffinity(0))}) == [1, 1, 1, 1]
    assert probe(None) == [everything, min(8, everything), 2, everything]
