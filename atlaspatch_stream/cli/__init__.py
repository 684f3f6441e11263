"""The `atlaspatch` command: upstream's commands and flags, as a thin layer over `atlaspatch_stream.api`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..pipeline import Mode
from .encode_cmd import (
    encode_patient_command,
    encode_slide_command,
    slide_encoders_option,
    with_slide_encoders,
)
from .options import (
    build_config,
    common_options,
    feature_options,
    input_options,
    parse_weights,
    watch_options,
)
from .qc_cmd import build_report, check, report
from .runner import execute, exit_with
from .scale import run_scaled_or_local, scale_options, slurm_template


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="atlaspatch-stream")
def cli() -> None:
    """atlaspatch-stream: tissue masks, patch coordinates and patch features for whole-slide images."""


@cli.command("process")
@input_options
@common_options
@feature_options
@slide_encoders_option
@scale_options
def process(wsi_path: Path, **params: Any) -> None:
    """Segment tissue, extract patch coordinates and embed patches with the chosen encoders (and slides, with
    --slide-encoders, as each slide's patch features complete)."""
    _run_slides(wsi_path, params, "features", "process")


@cli.command("segment-and-get-coords")
@input_options
@common_options
@scale_options
def segment_and_get_coords(wsi_path: Path, **params: Any) -> None:
    """Segment tissue and write patch coordinates (no features)."""
    _run_slides(wsi_path, params, "coords", "segment-and-get-coords")


@cli.command("detect-tissue")
@input_options
def detect_tissue(wsi_path: Path, **params: Any) -> None:
    """Write tissue-mask overlays (<stem>_mask.png, <stem>_mask_bw.png) under <out>/visualization/."""
    _run_slides(wsi_path, params, "detect", "detect-tissue")


@cli.command("watch")
@input_options
@common_options
@watch_options
@slide_encoders_option
def watch(wsi_path: Path, **params: Any) -> None:
    """Watch INPUT (the WSI_PATH folder) and process each slide once it has fully arrived, until stopped.

    Every `process` flag applies (--feature-extractors is optional: without it, coordinates only). The first
    SIGTERM/SIGINT stops intake and drains the slides in flight within --drain-timeout (default 120 s); a second
    cancels at once. State (ledger, status.json) lives in --state, by default a local folder per output,
    $XDG_STATE_HOME/atlaspatch/<hash of OUTPUT>; a state folder in use by a live daemon is refused.
    """
    from .watch_cmd import run_watch

    if not wsi_path.is_dir():
        raise click.UsageError(f"watch needs a folder, not a file: {wsi_path}")
    config = with_slide_encoders(build_config(params, features=True), params)
    exit_with(run_watch(wsi_path, config, once=params["once"], allow_root=params["allow_root"],
                        retry_quarantined=params["retry_quarantined"]))


@cli.command("status")
@click.argument("output", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The daemon's state folder, if not its default for OUTPUT.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--requeue", multiple=True, metavar="SLIDE",
              help="Give a slide (its path relative to INPUT) a new set of attempts (repeatable).")
@click.option("--report", "rebuild", is_flag=True, help="Also rebuild the QC gallery OUTPUT/qc/index.html now.")
def status(output: Path, state_dir: Path | None, as_json: bool, requeue: tuple[str, ...], rebuild: bool) -> None:
    """The daemon's ledger: slides per state, in flight, the last 10 failures and the quarantine list."""
    from .watch_cmd import run_status

    code = run_status(output, state_dir, as_json, requeue)
    if rebuild:
        build_report(output, to_stderr=as_json)
    exit_with(code)


def _run_slides(wsi_path: Path, params: dict[str, Any], mode: Mode, command: str) -> None:
    """Parse flags into a config, run the slides and leave with the exit status."""
    config = build_config(params, features=mode == "features")
    if mode == "features":
        config = with_slide_encoders(config, params)
    if mode == "detect":
        exit_with(execute(config, wsi_path, mode, command, params["verbose"]))
    exit_with(run_scaled_or_local(config, wsi_path, params, mode, command))


@cli.command("info")
def info() -> None:
    """Supported slide formats and the output layout."""
    from ..formats import IMAGE_EXTENSIONS, SUPPORTED_EXTENSIONS

    click.echo("Supported whole-slide formats: " + " ".join(sorted(SUPPORTED_EXTENSIONS - IMAGE_EXTENSIONS)))
    click.echo("Supported plain images (need --mpp-csv): " + " ".join(sorted(IMAGE_EXTENSIONS)))
    click.echo("Extensions are matched case-insensitively; the .dcm files of one folder form one slide.")
    click.echo("")
    click.echo("Output layout:")
    for line in (
        "<output>/patches/<stem>.h5              coords (N,5) int32, passports, features/<encoder> (N,D) float32",
        "<output>/patches/<stem>.lock            while a slide is being processed",
        "<output>/images/<stem>/<stem>_x{X}_y{Y}.png      with --save-images",
        "<output>/visualization/<stem>.png, <stem>_mask.png, <stem>_mask_bw.png, <stem>_contours.png",
        "<output>/patches/<stem>.h5 slide_features/<encoder>   slide embedding (D,) float32 (encode-slide)",
        "<output>/patient_features/<encoder>/<case_id>.h5     patient embedding 'features' (D,) (encode-patient)",
        "<output>/atlaspatch-report.jsonl        run report: one JSON event per slide and stage",
        "<output>/qc/thumbs/<stem>.jpg, .mask.png  with --qc (for atlaspatch report)",
        "<output>/qc/index.html                  QC gallery: atlaspatch report",
    ):
        click.echo("  " + line)


@cli.command("encoders")
@click.option("--check", is_flag=True, help="Build every architecture on the meta device and verify its output dim.")
@click.option("--strict", is_flag=True, help="With --check: an encoder whose extra is not installed is an error.")
@click.option("--weights", "weights", multiple=True, metavar="NAME=PATH", help="Local weights to report as present.")
@click.argument("names", nargs=-1)
def encoders(check: bool, strict: bool, weights: tuple[str, ...], names: tuple[str, ...]) -> None:
    """List encoder names with dim, input size, extra, licence, gated, and whether weights are present."""
    from .encoders_cmd import check_command, list_command

    if check:
        exit_with(check_command(names, strict))
    list_command(dict(parse_weights(weights)), names)


cli.add_command(slurm_template)
cli.add_command(encode_slide_command)
cli.add_command(encode_patient_command)
cli.add_command(check)
cli.add_command(report)


def main() -> None:
    """Console-script entry point."""
    from .allocator import tune_allocator

    tune_allocator()
    cli(prog_name="atlaspatch")
