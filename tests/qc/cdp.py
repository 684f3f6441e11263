"""A headless Chromium driven over the DevTools protocol (the `websockets` sync client): just what the gallery test
needs — open a page, evaluate script, take a screenshot, and record console errors and network requests."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The first Chromium-family binary on PATH (Debian's `chromium` package installs `chromium`)."""
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


class Page:
    """One tab, attached through the browser's DevTools endpoint (flat sessions)."""

    def __init__(self, ws: ClientConnection, session: str) -> None:
        self.ws, self.session = ws, session
        self._ids = itertools.count(1)
        self.console_errors: list[str] = []
        self.requests: list[str] = []
        self._events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """Send a command to the tab and wait for its reply (events seen meanwhile are recorded)."""
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params, "sessionId": self.session}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._record(message)

    def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for an event of the tab (one already recorded counts)."""
        deadline = time.monotonic() + timeout
        while True:
            for seen in self._events:
                if seen.get("method") == event:
                    self._events.remove(seen)
                    return seen
            self._record(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page."""
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method", ""), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.console_errors.append(json.dumps(params.get("args")))
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(json.dumps(params.get("exceptionDetails")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.console_errors.append(params["entry"].get("text", ""))
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        self._events.append(message)


@contextlib.contextmanager
def open_page(binary: str, profile: Path, width: int = 1400, height: int = 1000) -> Iterator[Page]:
    """Start headless Chromium (its own profile folder, no network proxy needed: nothing may be fetched) and attach
    to a blank tab with console, log, network and page events on."""
    proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = _devtools_url(proc)
        with connect(url, max_size=None, open_timeout=30) as ws:
            ws.send(json.dumps({"id": 0, "method": "Target.createTarget", "params": {"url": "about:blank"}}))
            target = _reply(ws, 0)["targetId"]
            ws.send(json.dumps({"id": -1, "method": "Target.attachToTarget",
                                "params": {"targetId": target, "flatten": True}}))
            page = Page(ws, _reply(ws, -1)["sessionId"])
            for domain in ("Page", "Runtime", "Log", "Network"):
                page.call(f"{domain}.enable")
            page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _devtools_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        found = re.search(r"DevTools listening on (ws://\S+)", line)
        if found:  # keep reading its stderr, so a chatty browser never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return found.group(1)
    raise RuntimeError("chromium did not print its DevTools address")


def _reply(ws: ClientConnection, ident: int) -> dict[str, Any]:
    while True:
        message = json.loads(ws.recv(timeout=30))
        if message.get("id") == ident:
            if "error" in message:
                raise RuntimeError(str(message["error"]))
            return message["result"]
