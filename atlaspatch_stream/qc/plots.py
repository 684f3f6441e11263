"""The report's run-level plots: matplotlib figures rendered to SVG text (no pyplot, no display, no global state)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

FIGSIZE = (5.0, 2.8)


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # a bare Figure draws without pyplot or a chosen backend

    fig = Figure(figsize=FIGSIZE, layout="constrained")
    return fig, fig.add_subplot()


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    return buffer.getvalue()


def _empty(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data in the run report", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def stage_busy(busy: Mapping[str, float]) -> str:
    """Horizontal bars: seconds each stage was busy over the last run."""
    fig, ax = _figure()
    if not busy:
        _empty(ax, "Stage busy time")
        return _svg(fig)
    names = list(busy)
    ax.barh(names, [busy[n] for n in names], color="#4c78a8")
    ax.invert_yaxis()
    ax.set_xlabel("busy seconds (sum over slides)")
    ax.set_title("Stage busy time")
    return _svg(fig)


def throughput(timeline: Sequence[Mapping[str, Any]], start: float) -> str:
    """Patches written and slides finished over the run's time."""
    fig, ax = _figure()
    if not timeline:
        _empty(ax, "Throughput over time")
        return _svg(fig)
    t = [float(e["time"]) - start for e in timeline]
    patches, total = [], 0
    for event in timeline:
        total += int(event.get("num_patches") or 0)
        patches.append(total)
    ax.step(t, patches, where="post", color="#4c78a8", label="patches")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("patches (cumulative)")
    slides = ax.twinx()
    slides.step(t, range(1, len(t) + 1), where="post", color="#f58518", label="slides")
    slides.set_ylabel("slides (cumulative)")
    ax.set_title("Throughput over time")
    return _svg(fig)


def queue_occupancy(timeline: Sequence[Mapping[str, Any]], start: float, sizes: Mapping[str, int]) -> str:
    """Items in each queue (as a share of its size) each time a slide finished."""
    fig, ax = _figure()
    sampled = [e for e in timeline if e.get("queues")]
    if not sampled:
        _empty(ax, "Queue occupancy")
        return _svg(fig)
    t = [float(e["time"]) - start for e in sampled]
    for name in sampled[0]["queues"]:
        size = max(1, int(sizes.get(name) or 1))
        ax.plot(t, [e["queues"].get(name, 0) / size for e in sampled], label=name, linewidth=1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("fill (used / size)")
    ax.legend(fontsize="x-small", ncols=2)
    ax.set_title("Queue occupancy (sampled as slides finish)")
    return _svg(fig)


def patches_histogram(counts: Sequence[int]) -> str:
    """How many slides have how many patches."""
    fig, ax = _figure()
    if not counts:
        _empty(ax, "Patches per slide")
        return _svg(fig)
    ax.hist(counts, bins=min(30, max(1, len(set(counts)))), color="#54a24b")
    ax.set_xlabel("patches")
    ax.set_ylabel("slides")
    ax.set_title("Patches per slide")
    return _svg(fig)
