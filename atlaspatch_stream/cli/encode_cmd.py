"""`encode-slide` and `encode-patient` (upstream 1.1), and `--slide-encoders` for `process` and `watch`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from ..config import PipelineConfig
from ..items import SlideJob
from ..sources.manifest import Manifest
from ..stages.embed import EMBEDDED
from .options import FEATURE_OPTIONS, _apply, build_config, common_options, input_options
from .runner import (
    SIGNAL_EXIT,
    check_output,
    execute,
    exit_with,
    ignore_late_signals,
    one_line_errors,
    run_command,
    write_line,
)


def _encoder_list(flag: str, required: bool) -> Any:
    return click.option(flag, required=required, default=None,
                        help="Encoder names separated by commas and/or spaces (titan, prism, moozy, "
                             "mean-<patch encoder>, plugins); each names the patch encoder it needs.")


slide_encoders_option = _encoder_list("--slide-encoders", False)
feature_runtime_options = _apply(FEATURE_OPTIONS[1:])


def parse_encoder_list(text: str, flag: str) -> tuple[str, ...]:
    """Comma and/or space separated names, lowercased, order kept; empty or duplicate names are usage errors."""
    names = tuple(n.lower() for n in text.replace(",", " ").split())
    if not names:
        raise click.BadParameter("no encoder given", param_hint=flag)
    if len(set(names)) != len(names):
        raise click.BadParameter("an encoder is named twice", param_hint=flag)
    return names


def planned(config: PipelineConfig, names: Sequence[str], *, patient: bool = False) -> PipelineConfig:
    """`plan_slide_encoders` with its errors as one `Error:` line (before any slide)."""
    from ..backends.encoders.slide_registry import plan_slide_encoders

    with one_line_errors("slide encoders"):
        return plan_slide_encoders(config, names, patient=patient)


def with_slide_encoders(config: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """`process`/`watch --slide-encoders`: the config with the slide encoders and their patch encoders."""
    text = params.pop("slide_encoders", None)
    return planned(config, parse_encoder_list(text, "--slide-encoders")) if text else config


def encode_slide(wsi_path: Path, params: dict[str, Any]) -> int:
    """`encode-slide`: patch features where missing, then each slide's embeddings as its features complete."""
    names = parse_encoder_list(params.pop("slide_encoders"), "--slide-encoders")
    config = planned(build_config(params, features=True), names)
    return execute(config, wsi_path, "features", "encode-slide", params["verbose"])


def encode_patient(manifest_path: Path, params: dict[str, Any]) -> int:
    """`encode-patient`: every manifest slide through the patch pipeline, then one file per case and encoder."""
    from ..sources.manifest import read_manifest

    names = parse_encoder_list(params.pop("patient_encoders"), "--patient-encoders")
    with one_line_errors("manifest"):
        manifest = read_manifest(manifest_path)
    config = planned(build_config(params, features=True), names, patient=True)
    check_output(config.write.output)
    summary, status = run_command(config, _jobs(manifest), "features", "encode-patient", params["verbose"])
    if status not in SIGNAL_EXIT.values():  # an interrupted run embeds no case
        slide_status = {r.job.path: r.status for r in summary.results}
        status = 1 if _embed_cases(config, manifest, names, slide_status) or status else 0
    ignore_late_signals()
    return status


def _jobs(manifest: Manifest) -> list[SlideJob]:
    from ..sources.discover import slide_job, stem_for

    mpp = {stem_for(p): v for p, v in manifest.mpp.items()}
    return [slide_job(path, i, mpp, check=False) for i, path in enumerate(manifest.slides())]


def _embed_cases(config: PipelineConfig, manifest: Manifest, names: Sequence[str], slide_status: Mapping[Path, str]
                 ) -> int:
    """One patient file per case and encoder; prints one line per failed case and a summary; returns failures."""
    from ..assembly import make_patient_embedder
    from ..errors import describe, is_bug
    from ..sources.discover import stem_for

    with one_line_errors("patient encoders"):
        embedder = make_patient_embedder(config, names, manifest.path)
        embedder.warm_up()
    done = failed = 0
    try:
        for case_id, slides in manifest.cases.items():
            bad = [str(p) for p in slides if slide_status.get(p) not in EMBEDDED]
            for encoder in embedder.encoders:
                if bad:
                    write_line(f"[FAIL] case {case_id} ({encoder.name}): slide(s) without features: {', '.join(bad)}")
                    failed += 1
                    continue
                h5s = [config.write.output / "patches" / f"{stem_for(p)}.h5" for p in slides]
                try:
                    outcome = embedder.embed_case(encoder, case_id, h5s)
                except Exception as exc:
                    if is_bug(exc):
                        raise
                    write_line(f"[FAIL] case {case_id} ({encoder.name}): {describe(exc)}")
                    failed += 1
                    continue
                if outcome == "locked":
                    write_line(f"[SKIP] case {case_id} ({encoder.name}): locked by another process")
                done += outcome != "locked"
    finally:
        embedder.close()
    write_line(f"Completed {done} patient embedding(s), failures: {failed}")
    return failed


@click.command("encode-slide")
@input_options
@common_options
@feature_runtime_options
@_encoder_list("--slide-encoders", True)
def encode_slide_command(wsi_path: Path, **params: Any) -> None:
    """Embed each slide with slide encoders (patch features computed first where missing, in the same run)."""
    exit_with(encode_slide(wsi_path, params))


@click.command("encode-patient")
@input_options
@common_options
@feature_runtime_options
@_encoder_list("--patient-encoders", True)
def encode_patient_command(**params: Any) -> None:
    """Embed each case of MANIFEST_PATH (CSV: case_id, slide_path[, mpp]; paths relative to the CSV's folder)."""
    exit_with(encode_patient(params.pop("manifest_path"), params))


def _manifest_argument(command: click.Command) -> None:
    """encode-patient takes a manifest instead of WSI_PATH, and has no --recursive and no --mpp-csv."""
    manifest = click.Argument(["manifest_path"], type=click.Path(exists=True, dir_okay=False, path_type=Path))
    kept = [p for p in command.params if p.name not in ("wsi_path", "recursive", "mpp_csv")]
    command.params = [manifest, *kept]


_manifest_argument(encode_patient_command)
