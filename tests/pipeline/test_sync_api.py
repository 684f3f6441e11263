"""The blocking twins in `atlaspatch_stream.sync`, used from plain threads."""

from __future__ import annotations

import threading
from pathlib import Path

from atlaspatch_stream.config import load_config
from atlaspatch_stream.sync import make_jobs, open_pipeline, process_slides
from atlaspatch_stream.testing.synthetic import write_synthetic_slide


def _config(out: Path):
    return load_config({"plan": {"patch_size": 256, "target_mag": 20},
                        "segment": {"segmenter": "otsu", "device": "cpu"},
                        "write": {"output": out}}, environ={})


def test_blocking_pipeline_submit_from_a_thread_and_iterate_results(tmp_path: Path) -> None:
    """Feed from one thread, read results in another: every slide finishes and the results end."""
    folder = tmp_path / "slides"
    for i in range(3):
        write_synthetic_slide(folder / f"s{i}.svs", width=1024, height=1024, seed=i)
    config = _config(tmp_path / "out")
    jobs = make_jobs([folder], config)
    with open_pipeline(config) as pipeline:

        def feed() -> None:
            for job in jobs:
                pipeline.submit(job)
            pipeline.close_input()

        feeder = threading.Thread(target=feed)
        feeder.start()
        results = list(pipeline.results())
        feeder.join()
        assert pipeline.statistics().totals.finished == 3
    assert sorted(r.job.stem for r in results) == ["s0", "s1", "s2"]
    assert all(r.status == "done" for r in results)


def test_blocking_process_slides(tmp_path: Path) -> None:
    """`sync.process_slides` returns a summary of every slide."""
    slide = write_synthetic_slide(tmp_path / "a.svs", width=1024, height=1024)
    summary = process_slides([slide], _config(tmp_path / "out"))
    assert summary.ok and summary.count("done") == 1
    assert (tmp_path / "out" / "patches" / "a.h5").exists()
