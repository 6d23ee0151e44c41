"""A real headless Chromium for report tests: load a page from file://, inspect it, screenshot it.

Debian's ``chromium-headless-shell`` (or ``chromium``) driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ending in NUL on fds 3 and 4), so no websocket client and
no downloaded browser are needed. ``find_chromium()`` returns None when there is none;
``require_chromium()`` turns that into a skip, or a failure under CI (``SINKLESS_REQUIRE_BROWSER=1``
or ``SINKLESS_REQUIRE_MODELS=1``: ``.ci/run`` installs the browser, so a missing one is a CI bug).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import tempfile
import time
from pathlib import Path

BINARIES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--mute-audio",
)
INSTALL_HINT = "apt-get install -y chromium-headless-shell (or chromium); .ci/run does it in CI"

# What a report page looks like from the inside: every image decoded and laid out, and the verdicts.
PAGE_FACTS = """
(async () => {
  const images = [...document.images];
  await Promise.all(images.map(i => i.decode().catch(() => null)));
  return {
    title: document.title,
    height: document.documentElement.scrollHeight,
    verdicts: [...document.querySelectorAll('.verdict')].map(e => e.innerText),
    text: document.body.innerText,
    images: images.map(i => ({alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth,
                               naturalHeight: i.naturalHeight, shownWidth: i.getBoundingClientRect().width,
                               shownHeight: i.getBoundingClientRect().height, scheme: i.src.split(':')[0],
                               visible: getComputedStyle(i).visibility !== 'hidden' && getComputedStyle(i).display !== 'none'})),
  };
})()
"""


def find_chromium() -> str | None:
    for name in BINARIES:
        if path := shutil.which(name):
            return path
    return None


def browser_required() -> bool:
    return any(os.environ.get(flag) == "1" for flag in ("SINKLESS_REQUIRE_BROWSER", "SINKLESS_REQUIRE_MODELS"))


def require_chromium() -> str:
    """The browser binary; skip without one, or fail when CI requires it."""
    import pytest

    path = find_chromium()
    if path is None:
        message = f"no headless Chromium on PATH (looked for {', '.join(BINARIES)}): {INSTALL_HINT}"
        if browser_required():
            pytest.fail(message + " [required: SINKLESS_REQUIRE_BROWSER/SINKLESS_REQUIRE_MODELS is set]")
        pytest.skip(message)
    return path


class Chromium:
    """One headless browser process and one page, driven over the DevTools pipe. Use as a context manager."""

    def __init__(self, binary: str | None = None, *, timeout: float = 60.0, width: int = 1200, height: int = 900):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise RuntimeError(f"no headless Chromium: {INSTALL_HINT}")
        self.timeout, self.width, self.height = timeout, width, height
        self.events: list[dict] = []
        self._next_id = 0
        self._buffer = b""

    # -- process -----------------------------------------------------------------------------------
    def __enter__(self) -> Chromium:
        self._profile = tempfile.TemporaryDirectory(prefix="sinkless-chromium-")
        self.log_path = Path(self._profile.name) / "chromium.log"
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the child's fds 3 and 4 must be exactly these pipe ends: move them out of the way first
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)
        argv = [self.binary, *FLAGS, f"--user-data-dir={self._profile.name}/profile", "--remote-debugging-pipe",
                f"--window-size={self.width},{self.height}", "about:blank"]
        actions = [
            (os.POSIX_SPAWN_OPEN, 1, str(self.log_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
            (os.POSIX_SPAWN_DUP2, child_in, 3),
            (os.POSIX_SPAWN_DUP2, child_out, 4),
        ]
        try:
            self.pid = os.posix_spawn(self.binary, argv, os.environ, file_actions=actions)
        finally:
            os.close(child_in)
            os.close(child_out)
        try:
            self._attach()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if getattr(self, "_to_browser", None) is not None:
                try:
                    self.call("Browser.close", timeout=5)
                except Exception:  # noqa: BLE001 - closing: the kill below covers it
                    pass
        finally:
            self._reap()
            for fd in (self._to_browser, self._from_browser):
                os.close(fd)
            self._to_browser = None
            self._profile.cleanup()

    def _reap(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)  # our own child, by its id
        os.waitpid(self.pid, 0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    # -- protocol ----------------------------------------------------------------------------------
    def call(self, method: str, params: dict | None = None, *, session: str | None = None, timeout: float | None = None) -> dict:
        """Send one DevTools command and wait for its answer (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for reply in self._read(deadline, method):
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                self.events.append(reply)

    def wait_for(self, event: str, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = len(self.events)
        for message in self.events[:seen]:
            if message.get("method") == event:
                return message
        while True:
            for message in self._read(deadline, event):
                self.events.append(message)
                if message.get("method") == event:
                    return message

    def _read(self, deadline: float, waiting_for: str) -> list[dict]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Chromium did not answer {waiting_for} in time; its log:\n{self.log()}")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited while waiting for {waiting_for}; its log:\n{self.log()}")
                self._buffer += chunk
        *messages, self._buffer = self._buffer.split(b"\0")
        return [json.loads(m) for m in messages if m]

    def _attach(self) -> None:
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next((t for t in targets if t["type"] == "page"), None)
        target = page["targetId"] if page else self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=self.session)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False}, session=self.session)

    # -- what tests use ----------------------------------------------------------------------------
    def open(self, url: str) -> None:
        """Navigate and wait for the load event (images included)."""
        self.events.clear()
        answer = self.call("Page.navigate", {"url": url}, session=self.session)
        if answer.get("errorText"):
            raise RuntimeError(f"cannot open {url}: {answer['errorText']}")
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        answer = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                           session=self.session)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"page script failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def page_facts(self) -> dict:
        return self.evaluate(PAGE_FACTS)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen since the last ``open``."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                found.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"log: {entry.get('text')} {entry.get('url', '')}")
        return found

    def screenshot(self, path: str | Path, *, max_height: int | None = None) -> Path:
        """A PNG of the page from the top: the whole page, or its first ``max_height`` pixels."""
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        if max_height is not None:
            height = min(height, max_height)
        clip = {"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1}
        data = self.call("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                         session=self.session)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path
