"""Which precision the encoders' forward ran in: said once with -v, and recorded in the run report's first line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
from click.testing import CliRunner

from atlaspatch_stream.backends.encoders.runtime import precision_label
from atlaspatch_stream.cli import cli
from atlaspatch_stream.cpu import native_bf16
from atlaspatch_stream.report import REPORT_NAME
from atlaspatch_stream.testing.synthetic import write_synthetic_slide


def test_float16_on_a_cpu_is_named_for_what_runs() -> None:
    """float16 on a CPU runs bf16 autocast where the CPU has native bf16, else float32, and the label says why."""
    label = precision_label("cpu", "float16")
    if native_bf16():
        assert label == "bfloat16 autocast (float16 requested; this CPU has native bf16)"
    else:
        assert label == "float32 (float16 requested; no native bf16 on this CPU)"
    assert precision_label("cpu", "float32") == "float32"
    assert precision_label("cuda", "float16") == "float16 autocast"


def test_float16_runs_float32_where_the_math_libraries_may_not_use_avx512() -> None:
    """Under `ONEDNN_MAX_CPU_ISA=AVX2` bf16 would be emulated (slow) even on a bf16 CPU: float16 runs float32."""
    probe = "from atlaspatch_stream.backends.encoders.runtime import precision_label; print(precision_label('cpu', 'float16'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}).stdout.strip()
    assert out == "float32 (float16 requested; no native bf16 on this CPU)"


def test_process_says_once_which_precision_ran_and_records_it(tmp_path: Path) -> None:
    """`process -v` with resnet18 (seeded random local weights) and color_stats at the default precision: one line
    per encoder says what its forward runs in, and the run report's run_start line carries the same."""
    import torch
    import torchvision

    slide = write_synthetic_slide(tmp_path / "s.svs", width=1024, height=1024, seed=3)
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["process", str(slide), "-o", str(out), "--patch-size", "256", "--target-mag",
                                      "20", "--segmenter", "otsu", "--device", "cpu", "-v", "--feature-extractors",
                                      "resnet18,color_stats", "--weights", f"resnet18={weights}"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    expected = {"resnet18": precision_label("cpu", "float16"), "color_stats": "exact (weight-free)"}
    said = result.stdout + result.stderr
    for name, ran in expected.items():
        assert said.count(f"encoder {name} runs in {ran}") == 1
    start = orjson.loads((out / REPORT_NAME).read_text().splitlines()[0])
    assert start["event"] == "run_start" and start["settings"]["precision_ran"] == expected
