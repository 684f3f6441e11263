"""`examples/service.py` under test: the real FastAPI app and the real pipeline (otsu, color_stats) on synthetic
slides, driven through httpx's ASGI transport with the app's own lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import h5py
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from atlaspatch_stream.testing.synthetic import write_synthetic_slide  # noqa: E402
from examples import service  # noqa: E402

pytestmark = pytest.mark.anyio



@pytest.fixture
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("slides")
    return [write_synthetic_slide(folder / f"s{i:02d}.svs", width=1024, height=768, seed=i) for i in range(20)]


@pytest.fixture
def service_env(tmp_path: Path, slides: list[Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example's settings, as an operator sets them: environment variables and a TOML file."""
    out = tmp_path / "out"
    toml = tmp_path / "service.toml"
    toml.write_text('[segment]\nsegmenter = "otsu"\ndevice = "cpu"\n[encode]\nextractors = ["color_stats"]\n'
                    'device = "cpu"\n[plan]\npatch_size = 256\ntarget_mag = 20\n')
    monkeypatch.setenv("ATLASPATCH_CONFIG", str(toml))
    monkeypatch.setenv("ATLASPATCH_WRITE__OUTPUT", str(out))
    monkeypatch.setenv("ATLASPATCH_QUEUES__JOBS", "4")
    monkeypatch.setenv("ATLASPATCH_OPEN__MAX_OPEN_SLIDES", "1")
    monkeypatch.setenv("ATLASPATCH_OPEN__OPEN_WORKERS", "1")
    monkeypatch.setenv("ATLASPATCH_SERVICE_ROOTS", str(slides[0].parent))
    return out


@asynccontextmanager
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan entered (pipeline open), and an httpx client on its ASGI transport."""
    async with service.lifespan(service.app):
        transport = httpx.ASGITransport(app=service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            yield http


def _complete(h5: str) -> int:
    with h5py.File(h5, "r") as f:
        n = int(f.attrs["num_patches"])
        assert n > 0 and f["coords"].shape == (n, 5) and f["features"]["color_stats"].shape == (n, 90)
    return n


async def test_one_slide_and_status(service_env: Path, slides: list[Path]) -> None:
    """POST one slide: 200 with its complete H5; again: 200 'skipped'; GET /status reports it."""
    with anyio.fail_after(120):
        async with client() as http:
            first = await http.post("/slides", json={"path": str(slides[0])})
            again = await http.post("/slides", json={"path": str(slides[0])})
            status = (await http.get("/status")).json()
    assert first.status_code == 200 and first.json()["status"] == "done"
    assert _complete(first.json()["h5"]) == first.json()["num_patches"]
    assert first.json()["seconds"] > 0 and set(first.json()) == {"status", "h5", "num_patches", "message", "seconds"}
    assert again.status_code == 200 and again.json()["status"] == "skipped"
    assert status["state"] == "running" and status["by_status"] == {"done": 1, "skipped": 1}


async def test_bad_paths_are_400_and_failed_slides_422(service_env: Path, slides: list[Path], tmp_path: Path) -> None:
    """Not a slide, missing, outside the allowed roots: 400; a slide that fails (corrupt file): 422 with its cause."""
    corrupt = slides[0].parent / "corrupt.svs"
    corrupt.write_bytes(b"II*\x00" + b"\x00" * 64)
    text = slides[0].parent / "notes.txt"
    text.write_text("not a slide")
    outside = write_synthetic_slide(tmp_path / "elsewhere" / "x.svs", width=1024, height=768)
    with anyio.fail_after(120):
        async with client() as http:
            answers = {name: await http.post("/slides", json={"path": str(path)}) for name, path in [
                ("text", text), ("missing", slides[0].parent / "gone.svs"), ("outside", outside),
                ("corrupt", corrupt)]}
    assert {name: r.status_code for name, r in answers.items()} == {
        "text": 400, "missing": 400, "outside": 400, "corrupt": 422}
    assert "corrupt.svs" in answers["corrupt"].json()["message"]
    assert "not under an allowed root" in answers["outside"].json()["message"]


async def test_twenty_concurrent_requests_against_a_queue_of_four(service_env: Path, slides: list[Path]) -> None:
    """20 requests at once into a pipeline with a job queue of 4 and one slide open: some get 503 with Retry-After,
    none is lost (every request is answered 200 or 503), every 200 has a complete H5, and only those slides have
    one."""
    answers: dict[Path, httpx.Response] = {}
    with anyio.fail_after(240):
        async with client() as http, anyio.create_task_group() as tg:

            async def post(slide: Path) -> None:
                answers[slide] = await http.post("/slides", json={"path": str(slide)})

            for slide in slides:
                tg.start_soon(post, slide)
    codes = [r.status_code for r in answers.values()]
    assert len(answers) == 20 and set(codes) == {200, 503}
    assert all(r.headers["Retry-After"] == "5" for r in answers.values() if r.status_code == 503)
    done = {s.stem for s, r in answers.items() if r.status_code == 200}
    for r in answers.values():
        if r.status_code == 200:
            assert _complete(r.json()["h5"]) == r.json()["num_patches"]
    assert {p.stem for p in (service_env / "patches").glob("*.h5")} == done


async def test_shutdown_drains_requests_in_flight(service_env: Path, slides: list[Path]) -> None:
    """Three requests in flight when the server shuts down (its lifespan exits, as uvicorn does on SIGTERM): all
    three are answered 200 with complete H5s; a request arriving during the drain gets 503."""
    answers: list[httpx.Response] = []
    ready, stop = anyio.Event(), anyio.Event()

    async def server() -> None:
        async with service.lifespan(service.app):
            ready.set()
            await stop.wait()

    with anyio.fail_after(240):
        async with anyio.create_task_group() as tg, httpx.AsyncClient(
                transport=httpx.ASGITransport(app=service.app), base_url="http://service") as http:
            tg.start_soon(server)
            await ready.wait()
            pipeline = service.app.state.pipeline

            async def post(slide: Path) -> None:
                answers.append(await http.post("/slides", json={"path": str(slide)}))

            for slide in slides[:3]:
                tg.start_soon(post, slide)
            while pipeline.submitted < 3:
                await anyio.sleep(0.01)
            stop.set()
            while pipeline.state == "running":
                await anyio.sleep(0.001)
            late = await http.post("/slides", json={"path": str(slides[3])})
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert all(_complete(r.json()["h5"]) for r in answers)
    assert late.status_code == 503 and "shutting down" in late.json()["message"]
