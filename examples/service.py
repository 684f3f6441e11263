"""A small FastAPI service embedding one atlaspatch-stream pipeline: submit a slide, get its features' H5 back.

Run it from the repository root (install the `[service]` extra first):

    ATLASPATCH_WRITE__OUTPUT=/data/out ATLASPATCH_SERVICE_ROOTS=/data/slides uvicorn examples.service:app

Settings are read the way the CLI reads them: `ATLASPATCH_<SECTION>__<KEY>` environment variables over a TOML file
named by `ATLASPATCH_CONFIG` over the defaults (e.g. `ATLASPATCH_ENCODE__EXTRACTORS=resnet50,color_stats`). Slides
are accepted only under the folders listed in `ATLASPATCH_SERVICE_ROOTS` (separated by `os.pathsep`; default: the
current folder), after resolving symlinks.

- `POST /slides` with `{"path": "..."}` answers `{"status", "h5", "num_patches", "message", "seconds"}`: 200 when the
  slide is done (or was already), 422 when it failed, 400 for a path that is not a slide (or outside the roots),
  409 when another process holds its lock, 503 with `Retry-After` when the pipeline is full or shutting down.
- `GET /status` answers the pipeline's `statistics()`.

On shutdown the pipeline stops taking slides and drains the ones in flight, so every accepted request gets its
answer; keep the server's graceful-shutdown timeout above the slowest slide.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from atlaspatch_stream import load_config
from atlaspatch_stream.api import default_mode, open_pipeline
from atlaspatch_stream.errors import NotASlideError, PipelineClosed, PipelineFull
from atlaspatch_stream.items import SlideResult
from atlaspatch_stream.pipeline import Pipeline
from atlaspatch_stream.report import flat_statistics

RETRY_AFTER_S = 5
STATUS_CODES = {"done": 200, "reused": 200, "skipped": 200, "failed": 422, "locked": 409, "cancelled": 503}


class SlideRequest(BaseModel):
    """The body of `POST /slides`."""

    path: str


def allowed_roots() -> list[Path]:
    """The folders slides may come from (`ATLASPATCH_SERVICE_ROOTS`, default the current folder), resolved."""
    text = os.environ.get("ATLASPATCH_SERVICE_ROOTS") or os.getcwd()
    return [Path(p).resolve() for p in text.split(os.pathsep) if p]


def checked_path(text: str, roots: list[Path]) -> Path:
    """The resolved slide path, or NotASlideError when it lies outside every allowed root."""
    if "\x00" in text:
        raise NotASlideError("a path may not contain NUL")
    path = Path(text).resolve()
    if not any(path.is_relative_to(root) for root in roots):
        raise NotASlideError(f"{text}: not under an allowed root")
    return path


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Hold one pipeline for the life of the server; on shutdown it drains the slides in flight."""
    config_file = os.environ.get("ATLASPATCH_CONFIG")
    config = load_config(toml_path=Path(config_file) if config_file else None)
    app.state.roots = allowed_roots()
    async with open_pipeline(config, mode=default_mode(config), command="service") as pipeline:
        app.state.pipeline = pipeline
        yield


app = FastAPI(title="atlaspatch-stream", lifespan=lifespan)


def _answer(result: SlideResult, started: float) -> JSONResponse:
    body = {"status": result.status, "h5": str(result.h5_path) if result.h5_path else None,
            "num_patches": result.num_patches, "message": result.message,
            "seconds": round(time.perf_counter() - started, 3)}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if result.status == "cancelled" else None
    return JSONResponse(body, status_code=STATUS_CODES[result.status], headers=headers)


def _refusal(code: int, message: str, started: float) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if code == 503 else None
    body = {"status": "refused", "h5": None, "num_patches": None, "message": message,
            "seconds": round(time.perf_counter() - started, 3)}
    return JSONResponse(body, status_code=code, headers=headers)


@app.post("/slides")
async def submit_slide(body: SlideRequest, request: Request) -> JSONResponse:
    """Process one slide and answer with its outcome (see the module docstring for the status codes)."""
    started = time.perf_counter()
    pipeline: Pipeline = request.app.state.pipeline
    try:
        job = pipeline.job_for(checked_path(body.path, request.app.state.roots))
        result = await pipeline.process_nowait(job)
    except NotASlideError as exc:
        return _refusal(400, str(exc), started)
    except PipelineFull as exc:
        return _refusal(503, str(exc), started)
    except PipelineClosed as exc:
        return _refusal(503, f"{exc}: the service is shutting down", started)
    return _answer(result, started)


@app.get("/status")
async def status(request: Request) -> dict[str, object]:
    """The pipeline's statistics: state, queue fill, slides in flight, totals, patches/s."""
    pipeline: Pipeline = request.app.state.pipeline
    return flat_statistics(pipeline.statistics())
