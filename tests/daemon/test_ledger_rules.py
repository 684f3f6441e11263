"""The ledger's rules as pure functions: reconciliation, typed failures, backoff, settings changes, operator actions."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest

from atlaspatch_stream.daemon.ledger.states import (
    Observation,
    RetryPolicy,
    Settings,
    SlideRecord,
    backoff_s,
    due,
    observe,
    on_done,
    on_error,
    reconcile,
    release,
    requeue,
    settings_change,
    vanish,
)
from atlaspatch_stream.daemon.naming import clean_stem, unique_stem
from atlaspatch_stream.errors import SlideError, failure_of, refused
from atlaspatch_stream.items import Failure

NOW = 1_700_000_000.0
POLICY = RetryPolicy(max_attempts=3, base_s=60, factor=4, max_s=3600)
SETTINGS = Settings("geo1", ("resnet50",))
# The one failure vocabulary: typed where the exception is caught, read by the ledger as it is.
SLIDE = failure_of(SlideError("Bogus marker length", slide="a.svs"), "read")
STALE = failure_of(OSError(errno.ESTALE, "Stale file handle"), "read")
DISK_FULL = Failure("write", "disk_full", "system", errno.ENOSPC)
INCOMPLETE = refused("check", "incomplete")


def _obs(slide_id: str, size: int = 100, mtime_ns: int = 5, fingerprint: str | None = None) -> Observation:
    return Observation(slide_id, slide_id, "file", size, mtime_ns, Path(slide_id).stem, fingerprint)


def _record(slide_id: str, state: str, **fields: object) -> SlideRecord:
    base = {"size": 100, "mtime_ns": 5, "stem": Path(slide_id).stem, "output_stem": Path(slide_id).stem}
    return SlideRecord(slide_id, slide_id, "file", state, **{**base, **fields})  # type: ignore[arg-type]


def test_new_slide_is_seen_and_a_growing_one_stays_seen_quietly() -> None:
    """A first sighting creates a `seen` record (version 1); while it is still `seen`, new sizes are taken without a
    new version."""
    first = observe(None, _obs("a.svs"), NOW)
    assert first is not None and first.after.state == "seen" and first.after.version == 1
    grown = observe(first.after, _obs("a.svs", size=200, mtime_ns=9), NOW + 1)
    assert grown is not None and grown.after.version == 1 and grown.after.size == 200
    assert observe(grown.after, _obs("a.svs", size=200, mtime_ns=9), NOW + 2) is None


@pytest.mark.parametrize("state", ["ready", "done", "failed", "quarantined", "deferred"])
def test_a_change_after_seen_is_a_new_version_with_a_clean_slate(state: str) -> None:
    """Size or mtime moved on a slide past `seen`: back to `seen`, version + 1, attempts and error forgotten."""
    record = _record("a.svs", state, attempts=2, error_kind="slide", error_msg="bad", output_h5="/o/a.h5")
    change = observe(record, _obs("a.svs", size=101), NOW)
    assert change is not None
    after = change.after
    assert (after.state, after.version, after.attempts, after.error_kind) == ("seen", 2, 0, None)
    assert after.output_h5 == "/o/a.h5" and after.output_stem == "a"  # the stem stays reserved for the rebuild


def test_touched_file_with_the_same_content_is_not_reprocessed() -> None:
    """Same size, newer mtime, same quick fingerprint: a "touch", the record stays `done`."""
    record = _record("a.svs", "done", fingerprint="qf1:x")
    change = observe(record, _obs("a.svs", mtime_ns=99, fingerprint="qf1:x"), NOW)
    assert change is not None and change.after.state == "done" and change.after.mtime_ns == 99


def test_deleted_slide_keeps_its_record_and_output_and_comes_back() -> None:
    """A vanished `done` slide is `missing` with its H5 path kept; back unchanged it is `done` again; back changed
    it is a new version to process."""
    done = _record("a.svs", "done", output_h5="/o/a.h5")
    gone = vanish(done, NOW)
    assert gone is not None and gone.after.state == "missing" and gone.after.output_h5 == "/o/a.h5"
    assert vanish(gone.after, NOW) is None
    back = observe(gone.after, _obs("a.svs"), NOW + 1)
    assert back is not None and back.after.state == "done"
    changed = observe(gone.after, _obs("a.svs", size=5), NOW + 1)
    assert changed is not None and (changed.after.state, changed.after.version) == ("seen", 2)


def test_startup_reconciliation_add_three_modify_one_delete_one() -> None:
    """While the daemon was down: 3 slides added, 1 done slide modified, 1 deleted, 1 left `running` by a crash.
    Start-up gives 3 new `seen`, the modified one a new version, the deleted one `missing`, and the crashed one
    `ready` with its attempts unchanged."""
    records = [_record("keep.svs", "done"), _record("mod.svs", "done"), _record("del.svs", "done"),
               _record("crash.svs", "running", attempts=1)]
    scanned = {s: _obs(s) for s in ("keep.svs", "crash.svs", "n1.svs", "n2.svs", "n3.svs")}
    scanned["mod.svs"] = _obs("mod.svs", size=300)
    changes = reconcile(records, scanned, NOW, startup=True)
    final = {c.after.slide_id: c.after for c in changes}
    assert {s: final[s].state for s in ("n1.svs", "n2.svs", "n3.svs")} == dict.fromkeys(("n1.svs", "n2.svs", "n3.svs"), "seen")
    assert (final["mod.svs"].state, final["mod.svs"].version) == ("seen", 2)
    assert final["del.svs"].state == "missing"
    assert (final["crash.svs"].state, final["crash.svs"].attempts) == ("ready", 1)
    assert "keep.svs" not in final


def test_running_is_released_only_at_startup() -> None:
    """A rescan while running leaves `running` slides alone; only start-up releases them."""
    records = [_record("a.svs", "running")]
    assert reconcile(records, {"a.svs": _obs("a.svs")}, NOW, startup=False) == []
    assert release(_record("a.svs", "done"), NOW) is None


def test_slide_errors_back_off_then_quarantine() -> None:
    """Slide errors: attempt 1 and 2 are `failed` with a full-jitter delay within 60 s and 240 s; attempt 3 is
    `quarantined`. The same seed gives the same delays."""
    record = _record("a.svs", "running")
    delays = []
    for limit in (60, 240):
        change = on_error(record, SLIDE, "corrupt tile", NOW, POLICY, random.Random(7))
        record = change.after
        assert record.state == "failed" and record.error_msg == "corrupt tile"
        delays.append(record.next_attempt_at - NOW)  # type: ignore[operator]
        assert 0 <= delays[-1] <= limit
        record = due(record, record.next_attempt_at).after  # type: ignore[arg-type, union-attr]
    final = on_error(record, SLIDE, "corrupt tile", NOW, POLICY, random.Random(7)).after
    assert (final.state, final.attempts, final.next_attempt_at) == ("quarantined", 3, None)
    again = _record("a.svs", "running")
    assert on_error(again, SLIDE, "x", NOW, POLICY, random.Random(7)).after.next_attempt_at == NOW + delays[0]


def test_transient_errors_are_never_charged_and_system_errors_defer() -> None:
    """Twenty transient errors in a row: attempts stay 0 and the slide is never quarantined (delays capped);
    a system error defers the slide without charge."""
    record = _record("a.svs", "running")
    for _ in range(20):
        record = on_error(record, STALE, "Stale file handle", NOW, POLICY, random.Random(1)).after
        assert record.state == "failed" and record.attempts == 0
        assert record.next_attempt_at - NOW <= POLICY.max_s  # type: ignore[operator]
    system = on_error(_record("b.svs", "running", attempts=2), DISK_FULL, "No space left on device", NOW, POLICY,
                      random.Random(1)).after
    assert (system.state, system.attempts) == ("deferred", 2)


def test_never_completed_is_quarantined_at_once() -> None:
    """A slide that stayed quiet but incomplete past the limit is quarantined with its reason."""
    after = on_error(_record("a.svs", "seen"), INCOMPLETE, "never completed", NOW, POLICY, random.Random()).after
    assert after.state == "quarantined" and after.error_kind == "incomplete"


def test_the_record_keeps_the_failure_kind_and_the_event_its_retry_class() -> None:
    """The ledger stores the typed failure's kind (no second vocabulary); its event detail adds class and stage."""
    assert (SLIDE.retry, STALE.retry) == ("slide", "transient")
    change = on_error(_record("a.svs", "running"), STALE, "Stale file handle", NOW, POLICY, random.Random(1))
    assert change.after.error_kind == "input_io" and change.after.attempts == 0
    assert dict(change.detail) | {"retry_in_s": 0} == {"kind": "input_io", "retry": "transient", "stage": "read",
                                                        "message": "Stale file handle", "retry_in_s": 0}
    locked = on_error(_record("b.svs", "running"), refused("prepare", "locked", "transient"), "locked", NOW, POLICY,
                      random.Random(1)).after
    assert (locked.state, locked.attempts, locked.error_kind) == ("failed", 0, "locked")


def test_backoff_grows_and_is_capped() -> None:
    """Ceilings 60, 240, 960, then capped at 3600; draws stay within [0, ceiling]."""
    rng = random.Random(3)
    for attempt, ceiling in [(1, 60), (2, 240), (3, 960), (4, 3600), (10, 3600)]:
        draws = [backoff_s(attempt, POLICY, rng) for _ in range(200)]
        assert min(draws) >= 0 and max(draws) <= ceiling and max(draws) > ceiling / 2


def test_settings_change_requeues_only_what_the_new_settings_need() -> None:
    """A done slide with the same geometry and the requested encoder stays done; one more encoder re-queues it
    needing that encoder only; another geometry re-queues it whole; a quarantined slide gets a fresh start."""
    done = _record("a.svs", "done", geometry_fp="geo1", encoders=("resnet50",), settings_fp="old")
    assert settings_change(done, Settings("geo1", ("resnet50",)), NOW) is None
    more = settings_change(done, Settings("geo1", ("resnet50", "uni_v1")), NOW)
    assert more is not None and more.after.state == "ready" and more.detail["needs"] == ["uni_v1"]
    geometry = settings_change(done, Settings("geo2", ("resnet50",)), NOW)
    assert geometry is not None and geometry.detail["needs"] == ["geometry"]
    quarantined = _record("b.svs", "quarantined", attempts=3, settings_fp="old")
    fresh = settings_change(quarantined, SETTINGS, NOW)
    assert fresh is not None and (fresh.after.state, fresh.after.attempts) == ("seen", 0)


def test_done_records_the_settings_and_accumulates_encoders() -> None:
    """Adding an encoder on the same geometry records both encoders; a new geometry records only the new ones."""
    record = _record("a.svs", "running", geometry_fp="geo1", encoders=("resnet50",))
    after = on_done(record, "/o/a.h5", Settings("geo1", ("uni_v1",)), NOW).after
    assert after.state == "done" and after.encoders == ("resnet50", "uni_v1") and after.output_h5 == "/o/a.h5"
    rebuilt = on_done(record, "/o/a.h5", Settings("geo2", ("uni_v1",)), NOW).after
    assert rebuilt.encoders == ("uni_v1",) and rebuilt.settings_fp == Settings("geo2", ("uni_v1",)).fingerprint


def test_operator_requeue() -> None:
    """`--requeue` and `--retry-quarantined` reset attempts; a running or missing slide is refused with a reason."""
    fresh = requeue(_record("a.svs", "quarantined", attempts=3, error_kind="slide"), NOW).after
    assert (fresh.state, fresh.attempts, fresh.error_kind) == ("seen", 0, None)
    with pytest.raises(ValueError, match="running"):
        requeue(_record("a.svs", "running"), NOW)
    with pytest.raises(ValueError, match="missing"):
        requeue(_record("a.svs", "missing"), NOW)


def test_due_only_when_the_time_has_come() -> None:
    """A failed slide is promoted back to `seen` at its retry time, not before."""
    record = _record("a.svs", "failed", next_attempt_at=NOW + 10)
    assert due(record, NOW + 9) is None
    promoted = due(record, NOW + 10)
    assert promoted is not None and promoted.after.state == "seen"


def test_output_stems_avoid_upstream_collisions_safely() -> None:
    """`a/x.svs` keeps upstream's `x`; `b/x.svs` and `x.ndpi` get stable hashed names; unsafe names are cleaned."""
    taken: set[str] = set()

    def assign(slide_id: str, stem: str) -> str:
        name = unique_stem(slide_id, stem, taken.__contains__)
        taken.add(name)
        return name

    first, second, third = assign("a/x.svs", "x"), assign("b/x.svs", "x"), assign("x.ndpi", "x")
    assert first == "x" and second.startswith("x__") and third.startswith("x__") and second != third
    assert unique_stem("b/x.svs", "x", {"x"}.__contains__) == second  # stable
    assert clean_stem("../../etc/passwd") == "_.._etc_passwd"
    assert clean_stem("a\nb\x00c") == "a_b_c" and clean_stem("..").startswith("slide-")
    assert len(clean_stem("é" * 400).encode()) <= 160


def test_settings_follow_the_geometry_fingerprint() -> None:
    """Settings of a run carry the H5 geometry fingerprint and the encoders; another patch size changes both the
    geometry part and the settings fingerprint, another encoder only the latter."""
    from atlaspatch_stream.config import EncodeConfig, PipelineConfig, PlanConfig, geometry_fingerprint

    base = PipelineConfig(encode=EncodeConfig(extractors=("resnet50",)))
    settings = Settings(geometry_fingerprint(base, "sha"), ("resnet50",))
    other = Settings(geometry_fingerprint(base.replace(plan=PlanConfig(patch_size=224)), "sha"), ("resnet50",))
    assert other.geometry_fp != settings.geometry_fp and other.fingerprint != settings.fingerprint
    more_encoders = base.replace(encode=EncodeConfig(extractors=("resnet50", "uni_v1")))
    more = Settings(geometry_fingerprint(more_encoders, "sha"), ("resnet50", "uni_v1"))
    assert more.geometry_fp == settings.geometry_fp and more.fingerprint != settings.fingerprint
