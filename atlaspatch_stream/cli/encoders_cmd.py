"""`atlaspatch encoders`: the listing and `--check`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click


def list_command(weights: dict[str, Path], names: Sequence[str]) -> None:
    """Print one row per encoder: name, dim, input, extra, licence, gated, weights present."""
    from ..backends.encoders.registry import describe_encoders

    rows = [r for r in describe_encoders(weights) if not names or r["name"] in names]
    click.echo(f"{'name':<30} {'dim':>5} {'input':>5}  {'extra':<9} {'gated':<5} {'weights':<8} licence")
    for r in rows:
        click.echo(f"{r['name']:<30} {r['dim']:>5} {r['input_size']:>5}  {r['extra'] or 'core':<9} "
                   f"{'yes' if r['gated'] else 'no':<5} {'present' if r['weights_present'] else 'missing':<8} "
                   f"{r['licence']}")


def check_command(names: Sequence[str], strict: bool = False) -> int:
    """Build each architecture on the meta device, run its pooling, compare dims.

    Returns 1 on a dim mismatch or build error; names whose extra is not installed are listed as skipped and count
    as errors only with `strict`.
    """
    from ..backends.encoders.check import check_encoders

    bad = skipped = 0
    for result in check_encoders(list(names) or None):
        if result.missing_extra is not None:
            skipped += 1
            click.echo(f"skip {result.name:<30} (needs extra '{result.missing_extra}')")
            continue
        status = "ok" if result.ok else "FAIL"
        detail = f"dim {result.got}" if result.ok else (result.error or f"dim {result.got} != {result.expected}")
        click.echo(f"{status:<4} {result.name:<30} {detail}  ({result.seconds:.2f}s)")
        bad += not result.ok
    tail = f", {skipped} skipped (extras not installed)" if skipped else ""
    click.echo((f"{bad} mismatch(es)" if bad else "all encoders ok") + tail)
    return 1 if bad or (strict and skipped) else 0
