"""The ledger's state machine as pure rules: from a record (and what was observed) to a `Change`, tested without a
database (reference `service-and-daemon.md` §2).

`observe`, `vanish`, `reconcile` (start-up and rescans), `on_done`, `on_error` (the typed failure's retry class, with
full-jitter backoff), `settings_change`, `requeue`, `release`, `resume`, `due`.

States: `seen → ready → running → done | failed | quarantined`, plus `deferred` (a system failure; never charged to
the slide) and `missing` (the source was deleted; the record and the H5 are kept).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import orjson

from ...config import WatchConfig
from ...items import Failure
from ..complete import SlideKind

State = Literal["seen", "ready", "running", "done", "failed", "quarantined", "deferred", "missing"]
STATES: tuple[str, ...] = get_args(State)


@dataclass(frozen=True)
class Settings:
    """The output-shaping settings a slide was (or is to be) processed with.

    Attributes:
        geometry_fp: `config.geometry_fingerprint(...)`: patch size, magnification, segmenter, thresholds.
        encoders: the feature extractors requested.
    """

    geometry_fp: str
    encoders: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        """One stable hash of both."""
        payload = orjson.dumps([self.geometry_fp, sorted(self.encoders)])
        return hashlib.sha256(payload).hexdigest()[:16]


@dataclass(frozen=True)
class Observation:
    """A slide as a scan (or an event) saw it.

    Attributes:
        slide_id: path relative to the watch root (NFC, `/`).
        source: the same path as it is spelled on disk (used to open it).
        kind: "file", "dicom" or "mrxs".
        size: bytes over all member files.
        mtime_ns: newest member mtime.
        stem: the natural output stem (`Path.stem`, or the DICOM folder's name).
        fingerprint: the quick fingerprint, when it was computed (otherwise size and mtime decide).
        pseudonym: the slide's keyed hash when pseudonymisation is on; it then also names the output.
    """

    slide_id: str
    source: str
    kind: SlideKind
    size: int
    mtime_ns: int
    stem: str
    fingerprint: str | None = None
    pseudonym: str | None = None


@dataclass(frozen=True)
class SlideRecord:
    """One slide's row in the ledger."""

    slide_id: str
    source: str
    kind: SlideKind
    state: State
    version: int = 1
    size: int = 0
    mtime_ns: int = 0
    fingerprint: str | None = None
    attempts: int = 0
    transient: int = 0  # uncharged retries in a row; only their backoff grows
    next_attempt_at: float | None = None
    error_kind: str | None = None
    error_msg: str | None = None
    stem: str = ""
    output_stem: str | None = None
    output_h5: str | None = None
    settings_fp: str | None = None
    geometry_fp: str | None = None
    encoders: tuple[str, ...] = ()
    pseudonym: str | None = None
    prior_state: str | None = None  # the state a missing slide had before it vanished
    ready_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    row_id: int | None = None

    @property
    def display(self) -> str:
        """The name for logs and metrics: the pseudonym when there is one."""
        return self.pseudonym or self.slide_id


@dataclass(frozen=True)
class Change:
    """One transition: the record before (None for a new slide), after, and why (for the events table)."""

    before: SlideRecord | None
    after: SlideRecord
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def from_state(self) -> str | None:
        """The state before, if any."""
        return self.before.state if self.before is not None else None


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of slide errors: full-jitter exponential backoff, then quarantine."""

    max_attempts: int = 3
    base_s: float = 60.0
    factor: float = 4.0
    max_s: float = 21600.0

    @classmethod
    def from_config(cls, watch: WatchConfig) -> RetryPolicy:
        """From a `WatchConfig`."""
        return cls(watch.max_attempts, watch.backoff_base_s, watch.backoff_factor, watch.backoff_max_s)


def backoff_s(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Full jitter: uniform(0, min(max, base × factor^(attempt-1))) seconds (AWS's "full jitter")."""
    ceiling = min(policy.max_s, policy.base_s * policy.factor ** max(0, attempt - 1))
    return rng.uniform(0.0, ceiling)


def with_(record: SlideRecord, now: float, **changes: Any) -> SlideRecord:
    """`record` with `changes` and a new `updated_at`."""
    return dataclasses.replace(record, updated_at=now, **changes)


def _fresh(record: SlideRecord, now: float, **changes: Any) -> SlideRecord:
    """Back to `seen` with a clean slate: no attempts, no error, no due time."""
    return with_(
        record, now, state="seen", attempts=0, transient=0, next_attempt_at=None, error_kind=None, error_msg=None,
        ready_at=None, started_at=None, **changes,
    )


def classify_change(record: SlideRecord, obs: Observation) -> Literal["same", "touched", "changed"]:
    """Did the file change? Same size and mtime: "same"; only the mtime moved and the fingerprint matches: "touched"."""
    if obs.size == record.size and obs.mtime_ns == record.mtime_ns:
        return "same"
    if obs.size == record.size and obs.fingerprint is not None and obs.fingerprint == record.fingerprint:
        return "touched"
    return "changed"


def observe(record: SlideRecord | None, obs: Observation, now: float) -> Change | None:
    """A slide seen by a scan: new, changed, touched, back from missing, or nothing to do.

    A record still `seen` (arriving) takes new sizes quietly; any later state sees a change as a new version that
    goes back to `seen` (a re-scanned glass under the same name is re-processed and its H5 rebuilt).
    """
    if record is None:
        after = SlideRecord(
            slide_id=obs.slide_id, source=obs.source, kind=obs.kind, state="seen", size=obs.size,
            mtime_ns=obs.mtime_ns, fingerprint=obs.fingerprint, stem=obs.stem, pseudonym=obs.pseudonym,
            created_at=now, updated_at=now,
        )
        return Change(None, after, "discovered")
    verdict = classify_change(record, obs)
    identity = {"size": obs.size, "mtime_ns": obs.mtime_ns, "source": obs.source}
    if record.state == "missing":
        if verdict != "changed" and record.prior_state == "done":
            return Change(record, with_(record, now, state="done", prior_state=None, **identity), "reappeared unchanged")
        return Change(record, _fresh(record, now, version=record.version + 1, prior_state=None, **identity), "reappeared")
    if verdict == "same":
        return None
    if verdict == "touched":
        return Change(record, with_(record, now, **identity), "touched (same content)")
    if record.state == "seen":
        return Change(record, with_(record, now, **identity), "still arriving")
    after = _fresh(record, now, version=record.version + 1, fingerprint=obs.fingerprint, **identity)
    return Change(record, after, f"changed while {record.state}")


def vanish(record: SlideRecord, now: float) -> Change | None:
    """The source is gone: keep the record (and its H5), mark it `missing`."""
    if record.state == "missing":
        return None
    after = with_(record, now, state="missing", prior_state=record.state, next_attempt_at=None)
    return Change(record, after, "source deleted")


def needs_rerun(record: SlideRecord, settings: Settings) -> tuple[str, ...] | None:
    """What a `done` slide lacks under `settings`: None (nothing), ("geometry",) or the missing encoders."""
    if record.geometry_fp != settings.geometry_fp:
        return ("geometry",)
    missing = tuple(sorted(set(settings.encoders) - set(record.encoders)))
    return missing or None


def settings_change(record: SlideRecord, settings: Settings, now: float) -> Change | None:
    """Re-queue what new settings need: a `done` slide that lacks something; a quarantined slide gets a new chance."""
    if record.settings_fp == settings.fingerprint:
        return None
    if record.state == "done":
        lacking = needs_rerun(record, settings)
        if lacking is None:
            return None
        after = with_(record, now, state="ready", attempts=0, transient=0, ready_at=now, error_kind=None, error_msg=None)
        return Change(record, after, "settings changed", {"needs": list(lacking)})
    if record.state == "quarantined":
        return Change(record, _fresh(record, now), "settings changed: retried")
    return None


def release(record: SlideRecord, now: float, reason: str = "interrupted; no attempt charged") -> Change | None:
    """A `running` slide whose processing was stopped (shutdown, crash) goes back to `ready`, uncharged."""
    if record.state != "running":
        return None
    return Change(record, with_(record, now, state="ready", started_at=None, ready_at=record.ready_at or now), reason)


def resume(record: SlideRecord, now: float) -> Change | None:
    """A `deferred` slide (system error) goes back to `ready` once the system recovered."""
    if record.state != "deferred":
        return None
    return Change(record, with_(record, now, state="ready", ready_at=now), "system recovered")


def due(record: SlideRecord, now: float) -> Change | None:
    """A `failed` slide whose retry time has come goes back to `seen` (re-checked, then queued)."""
    if record.state != "failed" or record.next_attempt_at is None or record.next_attempt_at > now:
        return None
    return Change(record, with_(record, now, state="seen", next_attempt_at=None, ready_at=None), "retry due")


def requeue(record: SlideRecord, now: float) -> Change:
    """An operator's `--requeue SLIDE` / `--retry-quarantined`: back to `seen` with its attempts forgotten.

    Raises:
        ValueError: the slide is running now, or its source is missing.
    """
    if record.state == "running":
        raise ValueError(f"{record.slide_id}: running now; requeue it after it finishes")
    if record.state == "missing":
        raise ValueError(f"{record.slide_id}: its source is missing")
    return Change(record, _fresh(record, now), "requeued by operator")


def _settings_fields(record: SlideRecord, settings: Settings) -> dict[str, Any]:
    same_geometry = record.geometry_fp == settings.geometry_fp
    encoders = set(settings.encoders) | (set(record.encoders) if same_geometry else set())
    return {"settings_fp": settings.fingerprint, "geometry_fp": settings.geometry_fp, "encoders": tuple(sorted(encoders))}


def on_done(record: SlideRecord, output_h5: str, settings: Settings, now: float) -> Change:
    """Processing finished: `done` with its output and the settings that made it (a missing slide stays missing)."""
    common = {"output_h5": output_h5, "finished_at": now, "error_kind": None, "error_msg": None, "transient": 0,
              "next_attempt_at": None, **_settings_fields(record, settings)}
    if record.state == "missing":
        return Change(record, with_(record, now, prior_state="done", **common), "finished after its source vanished")
    return Change(record, with_(record, now, state="done", **common), "done")


def on_error(
    record: SlideRecord, failure: Failure, message: str, now: float, policy: RetryPolicy, rng: random.Random,
    settings: Settings | None = None,
) -> Change:
    """A failure, by its retry class (reference §2.3); the record keeps `failure.kind`, the event its class too.

    - slide (corrupt, unsupported, no tissue, no magnification; or a broken completeness check): one attempt
      charged; `failed` with a full-jitter backoff, or `quarantined` once `max_attempts` are used.
    - kind "incomplete" (quiet but never complete): `quarantined` at once; a change to the file brings it back.
    - transient (vanished, I/O error on a share, locked by another worker): `failed` with a backoff on the
      uncharged count; never quarantined.
    - system (disk full, output unwritable, device lost): `deferred`, uncharged; the caller pauses intake.
    """
    kind, retry = failure.kind, failure.retry
    detail = {"kind": kind, "retry": retry, "stage": failure.stage, "message": message}
    base: dict[str, Any] = {"error_kind": kind, "error_msg": message, "started_at": None}
    if settings is not None:
        base["settings_fp"] = settings.fingerprint
    if record.state == "missing":
        return Change(record, with_(record, now, **base), f"{retry} error after its source vanished", detail)
    if retry == "system":
        return Change(record, with_(record, now, state="deferred", **base), f"system error ({kind}): deferred", detail)
    if retry == "transient":
        count = record.transient + 1
        delay = backoff_s(count, policy, rng)
        after = with_(record, now, state="failed", transient=count, next_attempt_at=now + delay, **base)
        return Change(record, after, f"transient error ({kind}): retry, not charged",
                      {**detail, "retry_in_s": round(delay, 3)})
    attempts = record.attempts + 1
    if kind == "incomplete" or attempts >= policy.max_attempts:
        after = with_(record, now, state="quarantined", attempts=attempts, transient=0, next_attempt_at=None, **base)
        return Change(record, after, f"quarantined after {attempts} attempt(s) ({kind})", detail)
    delay = backoff_s(attempts, policy, rng)
    after = with_(record, now, state="failed", attempts=attempts, transient=0, next_attempt_at=now + delay, **base)
    return Change(record, after, f"attempt {attempts} failed ({kind})", {**detail, "retry_in_s": round(delay, 3)})


def reconcile(
    records: Iterable[SlideRecord], scanned: Mapping[str, Observation], now: float, *,
    startup: bool, settings: Settings | None = None,
) -> list[Change]:
    """Merge a full scan into the ledger (reference §1.4).

    Args:
        records: the ledger's records (at least every one that may change; others are simply untouched).
        scanned: what the scan found, by slide ID.
        now: the time of the scan.
        startup: also apply the start-up rules: `running` (left by a crash) back to `ready` without charging an
            attempt, and `deferred` back to `ready` (the restart is the probe).
        settings: when given, re-queue what these settings need (`settings_change`).

    Returns:
        The changes, in order; several may concern one slide (each applies to the previous one's `after`).
    """
    changes: list[Change] = []
    known: dict[str, SlideRecord] = {}

    def step(change: Change | None) -> None:
        if change is not None:
            changes.append(change)
            known[change.after.slide_id] = change.after

    for record in records:
        known[record.slide_id] = record
        if startup:
            step(release(record, now, "interrupted by a stop or crash; no attempt charged"))
            step(resume(known[record.slide_id], now))
    for slide_id in sorted(scanned):  # sorted: within one scan, the first to claim a stem is deterministic
        step(observe(known.get(slide_id), scanned[slide_id], now))
    for slide_id in list(known):
        if slide_id not in scanned:
            step(vanish(known[slide_id], now))
    if settings is not None:
        for slide_id in list(known):
            step(settings_change(known[slide_id], settings, now))
    return changes
