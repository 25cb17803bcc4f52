"""A headless Chromium driven over the Chrome DevTools protocol (CDP), for looking at the web UIs.

No browser download and no driver package: Debian's `chromium` (`make ui-deps`) is started with
`--remote-debugging-port=0`, the port it picked is read from `DevToolsActivePort` in its fresh
profile, and one page is driven through the browser's websocket with `websockets` (already in the
lock, through uvicorn). The flags are the ones known to work on this closed network: without the
background-networking ones Chromium keeps trying to reach Google's hosts.

Run by hand against servers that are up, e.g. `mfpipe up`:

    .venv/bin/python -m tests.ui.browser http://127.0.0.1:4200/runs reports/ui/prefect.png --wait Runs
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.sync.client import ClientConnection, connect

#: Flags from the machine notes ("Known to work"): headless, no GPU, no calls home, fresh profile.
CHROMIUM_FLAGS = (
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-default-browser-check",
    "--no-proxy-server",  # every page here is on 127.0.0.1
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The Chromium executable: `/usr/bin/chromium` (Debian's package) or another on PATH, else None."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def plain(text: str) -> str:
    """Text with every run of blanks (line breaks, non-breaking spaces) as one space, as a reader sees it."""
    return " ".join(text.replace("\xa0", " ").split())


class BrowserError(RuntimeError):
    """Chromium did not start, or a DevTools command answered with an error."""


class Browser:
    """One headless Chromium with one page; a context manager that always ends the browser it started."""

    def __init__(self, executable: str, width: int = 1440, height: int = 900, start_timeout: float = 30.0) -> None:
        self.executable = executable
        self.width, self.height = width, height
        self.start_timeout = start_timeout
        self._ids = itertools.count(1)
        self._profile: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: ClientConnection | None = None
        self._session: str | None = None

    # -- life cycle ----------------------------------------------------------------------------------
    def __enter__(self) -> Browser:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _start(self) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="mfpipe-chromium-", ignore_cleanup_errors=True)
        profile = Path(self._profile.name)
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={self.width},{self.height}"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to start its sandbox as root
        self._log = (profile / "chromium.log").open("wb")
        self._process = subprocess.Popen(
            [self.executable, *flags, "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self._process.poll() is not None:
                raise BrowserError(f"{self.executable} exited with code {self._process.returncode}: {self._tail()}")
            if time.monotonic() > deadline:
                waited = f"{self.start_timeout:.0f} s"
                raise BrowserError(f"{self.executable}: no DevTools port after {waited}: {self._tail()}")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self._socket = connect(f"ws://127.0.0.1:{port}{path}", proxy=None, max_size=None, open_timeout=10)
        target = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, browser=True)[
            "sessionId"
        ]
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )

    def _tail(self) -> str:
        if self._profile is None:
            return ""
        log = Path(self._profile.name) / "chromium.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return " | ".join(lines[-5:])

    def close(self) -> None:
        """Close the websocket, end Chromium and its helpers (SIGTERM, SIGKILL after 10 s), remove its profile."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            # Its helpers (zygote, renderers, GPU process) share the session it was started in: end them too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._log.close()
            self._process = None
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None

    # -- DevTools ------------------------------------------------------------------------------------
    def send(
        self, method: str, params: dict[str, Any] | None = None, browser: bool = False, timeout: float = 30.0
    ) -> Any:
        """One CDP command on the page's session (or the browser's); its result, events in between dropped."""
        if self._socket is None:
            raise BrowserError("browser is not running")
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if not browser:
            message["sessionId"] = self._session
        self._socket.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer within {timeout:.0f} s")
            reply = json.loads(self._socket.recv(timeout=left))
            if reply.get("id") != message["id"]:
                continue  # an event, or the answer to nothing we wait for
            if "error" in reply:
                raise BrowserError(f"{method}: {reply['error'].get('message')}")
            return reply.get("result", {})

    def goto(self, url: str) -> None:
        """Navigate; the SPA then renders on its own, so callers wait for text (`wait_for_text`)."""
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value in the page (JSON-serialisable values only)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def text(self) -> str:
        """What a person reads: the rendered `innerText` of the page's body."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needles: list[str], timeout: float = 60.0, settle: float = 1.0) -> str:
        """Poll the rendered text until every needle shows (then wait `settle` s for late paints); the text.

        Needles and text are compared with blanks collapsed (line breaks, non-breaking spaces: one space).
        Raises AssertionError with what the page did show when a needle is still missing at the timeout.
        """
        deadline = time.monotonic() + timeout
        wanted = [plain(needle) for needle in needles]
        while True:
            text = self.text()
            shown = plain(text)
            missing = [needle for needle in wanted if needle not in shown]
            if not missing:
                time.sleep(settle)
                return self.text()
            if time.monotonic() > deadline:
                raise AssertionError(f"not shown within {timeout:.0f} s: {missing}; the page shows: {shown[:2000]!r}")
            time.sleep(0.5)

    def screenshot(self, path: Path) -> Path:
        """What the viewport shows, as a PNG at `path` (folders made)."""
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


def main(argv: list[str] | None = None) -> int:
    """Open URL, wait for the given texts, save a screenshot; print the path and the page's text."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("png", type=Path)
    parser.add_argument("--wait", action="append", default=[], help="text that must show (repeatable)")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    executable = find_chromium()
    if executable is None:
        parser.error("no chromium on this machine (make ui-deps)")
    with Browser(executable) as browser:
        browser.goto(args.url)
        text = browser.wait_for_text(args.wait, args.timeout)
        print(browser.screenshot(args.png).resolve())
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
