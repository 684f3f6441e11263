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


def _svg(fig: Any, ax: Any, title: str) -> str:
    """The figure as SVG text, with `title` on its axes."""
    ax.set_title(title)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    return buffer.getvalue()


def _empty(fig: Any, ax: Any, title: str) -> str:
    ax.text(0.5, 0.5, "no data in the run report", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return _svg(fig, ax, title)


def stage_busy(busy: Mapping[str, float]) -> str:
    """Horizontal bars: seconds each stage was busy over the last run."""
    fig, ax = _figure()
    if not busy:
        return _empty(fig, ax, "Stage busy time")
    names = list(busy)
    ax.barh(names, [busy[n] for n in names], color="#4c78a8")
    ax.invert_yaxis()
    ax.set_xlabel("busy seconds (sum over slides)")
    return _svg(fig, ax, "Stage busy time")


def throughput(timeline: Sequence[Mapping[str, Any]], start: float) -> str:
    """Patches written and slides finished over the run's time."""
    fig, ax = _figure()
    if not timeline:
        return _empty(fig, ax, "Throughput over time")
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
    return _svg(fig, ax, "Throughput over time")


def queue_occupancy(timeline: Sequence[Mapping[str, Any]], start: float, sizes: Mapping[str, int]) -> str:
    """Items in each queue (as a share of its size) each time a slide finished."""
    fig, ax = _figure()
    sampled = [e for e in timeline if e.get("queues")]
    if not sampled:
        return _empty(fig, ax, "Queue occupancy")
    t = [float(e["time"]) - start for e in sampled]
    for name in sampled[0]["queues"]:
        size = max(1, int(sizes.get(name) or 1))
        ax.plot(t, [e["queues"].get(name, 0) / size for e in sampled], label=name, linewidth=1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("fill (used / size)")
    ax.legend(fontsize="x-small", ncols=2)
    return _svg(fig, ax, "Queue occupancy (sampled as slides finish)")


def patches_histogram(counts: Sequence[int]) -> str:
    """How many slides have how many patches."""
    fig, ax = _figure()
    if not counts:
        return _empty(fig, ax, "Patches per slide")
    ax.hist(counts, bins=min(30, max(1, len(set(counts)))), color="#54a24b")
    ax.set_xlabel("patches")
    ax.set_ylabel("slides")
    return _svg(fig, ax, "Patches per slide")
