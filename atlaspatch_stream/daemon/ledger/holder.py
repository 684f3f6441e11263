"""One daemon per state folder: the ledger's writer holds `<ledger>.lock` through the claims protocol of
`outputs.claims` (exclusive create, holder payload with host and pid, stale once its process is gone), so a second
daemon pointed at the same state folder is refused with one line naming the holder."""

from __future__ import annotations

from pathlib import Path

from ...errors import OutputError
from ...outputs.claims import Claim, Holder, judge, read_holder, try_claim
from .store import LedgerError


def holder_path(ledger: Path) -> Path:
    """The lock beside the ledger file that names the daemon holding it."""
    return Path(ledger).with_name(Path(ledger).name + ".lock")


def _refusal(ledger: Path, holder: Holder | None) -> LedgerError:
    who = f"pid {holder.pid} on {holder.host}" if holder is not None and holder.pid is not None else "another process"
    return LedgerError(f"state folder {Path(ledger).parent} is in use by a live daemon ({who}); give each daemon its "
                       f"own --state")


def check_free(ledger: Path) -> None:
    """Refuse early (before models load) when a live daemon holds the ledger at `ledger`.

    Raises:
        LedgerError: naming the holder's host and pid.
    """
    verdict = judge(holder_path(ledger))
    if verdict.state == "held":
        raise _refusal(ledger, verdict.holder)


def hold(ledger: Path) -> Claim:
    """Take the ledger's holder lock for this process (a stale one, left by a dead daemon, is taken over).

    Raises:
        LedgerError: a live daemon holds it (naming its host and pid), or the lock cannot be written.
    """
    path = holder_path(ledger)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        claim = try_claim(path, slide=str(Path(ledger).parent), purpose="watch")
    except (OutputError, OSError) as exc:
        raise LedgerError(f"cannot lock the state folder {Path(ledger).parent}: {exc}") from exc
    if claim is None:
        raise _refusal(ledger, read_holder(path))
    return claim
