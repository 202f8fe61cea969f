"""The server as a subprocess, and the processes around it, seen from a test.

What the suites that run ``python -m trio_portfolio`` share: an environment
cleared of ``PORTFOLIO_*`` settings (so only the flags a test gives count),
a server process whose output is captured and which is stopped for sure on
the way out (SIGTERM, then SIGKILL, so that no embedded redis-server is
orphaned), ``/ready`` polling, and ``/proc`` walks (Linux) for the
redis-servers and workers a test must see come and go.  Also a small Trio
TCP server in a thread of its own, for synchronous tests (the browser ones)
that need a peer on a localhost port.
"""

from __future__ import annotations

import functools
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import attrs
import trio

from trio_portfolio.testing.redis_servers import free_port

#: How the suites start the server: the same entry point as the ``trio-portfolio`` script.
CLI = [sys.executable, "-m", "trio_portfolio"]
#: How long a server subprocess may take to answer ``/ready`` with 200.
STARTUP = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``PORTFOLIO_*`` setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTFOLIO_")}
    env.update(extra)
    return env


async def drain(stream: trio.abc.ReceiveStream | None, into: bytearray) -> None:
    """Append everything ``stream`` says to ``into`` until it closes (a pipe must not fill)."""
    assert stream is not None
    async with stream:
        async for chunk in stream:
            into += chunk


@attrs.define
class ServerProcess:
    """A ``serve`` subprocess, its port, and what it wrote (when captured)."""

    process: trio.Process
    port: int
    stdout: bytearray = attrs.field(factory=bytearray)
    stderr: bytearray = attrs.field(factory=bytearray)

    def log(self) -> str:
        """Its stderr (the log) as text."""
        return self.stderr.decode(errors="replace")

    def log_lines(self) -> list[str]:
        """Its non-empty log lines."""
        return [line for line in self.log().splitlines() if line]

    async def stop(self, signum: signal.Signals = signal.SIGTERM, timeout: float = 5.0) -> int:
        """Send ``signum`` and wait (at most ``timeout``) for the exit code.

        Raises:
            trio.TooSlowError: the process did not exit within ``timeout``.
        """
        self.process.send_signal(signum)
        with trio.fail_after(timeout):
            return await self.process.wait()


async def stop_process(process: trio.Process) -> None:
    """SIGTERM, up to 10 s of grace, then SIGKILL; shielded, so a failing test still reaps it."""
    with trio.CancelScope(shield=True):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await process.wait()
        if process.poll() is None:
            process.kill()
        await process.wait()


@asynccontextmanager
async def server_process(
    *args: str, env: dict[str, str] | None = None, capture_stdout: bool = False
) -> AsyncIterator[ServerProcess]:
    """``trio-portfolio serve --port <free> *args``; stopped for sure on the way out.

    ``env`` defaults to :func:`clean_env`; stderr is always captured, stdout
    only with ``capture_stdout`` (otherwise it goes to /dev/null).
    """
    port = free_port()
    process = await trio.lowlevel.open_process(
        [*CLI, "serve", "--port", str(port), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env() if env is None else env,
    )
    server = ServerProcess(process, port)
    async with trio.open_nursery() as nursery:
        if capture_stdout:
            nursery.start_soon(drain, process.stdout, server.stdout)
        nursery.start_soon(drain, process.stderr, server.stderr)
        try:
            yield server
        finally:
            await stop_process(process)


async def ready_status(port: int) -> int | None:
    """The status of ``GET /ready``, or None if nothing answers (within 2 s)."""
    request = b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    try:
        with trio.fail_after(2):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(request)
                head = b""
                while b"\r\n" not in head:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return None
                    head += chunk
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        return None
    try:
        return int(head.split()[1])
    except (IndexError, ValueError):
        return None


async def wait_for_ready(port: int, want: int = 200, timeout: float = STARTUP) -> float:
    """Poll ``/ready`` until it answers ``want``; the seconds it took.

    The listener comes up before the store is open, so a refused or 503
    answer is not an error here.

    Raises:
        trio.TooSlowError: ``want`` was not answered within ``timeout``.
    """
    started = trio.current_time()
    with trio.fail_after(timeout):
        while await ready_status(port) != want:  # noqa: ASYNC110  # polling from outside
            await trio.sleep(0.02)
    return trio.current_time() - started


def is_gone(pid: int) -> bool:
    """No such process, or a zombie (exited; its parent has not reaped it yet)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rpartition(")")[2].split()[0] == "Z"


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    return not is_gone(pid)


def redis_servers_in(data_dir: Path) -> list[int]:
    """Pids of live redis-server processes working in ``data_dir`` (Linux /proc).

    Found by working directory (``--dir`` makes Redis chdir there), since
    redis-server rewrites its command line to a process title; zombies do
    not count.
    """
    target = os.fsencode(data_dir.resolve())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes()
            cwd = os.readlink(os.path.join(b"/proc", entry.encode(), b"cwd"))
        except OSError:
            continue
        if b"redis-server" in cmdline and cwd == target and not is_gone(int(entry)):
            found.append(int(entry))
    return found


@contextmanager
def threaded_tcp_server(
    handler: Callable[[trio.SocketStream], Awaitable[None]], name: str, timeout: float = 30.0
) -> Iterator[int]:
    """``handler`` serving a free localhost port from ``trio.run`` in a thread; the port.

    For synchronous tests (a browser driven by playwright) that need a Trio
    peer: the server is cancelled and its thread joined on the way out.

    Raises:
        queue.Empty: the server did not start listening within ``timeout``.
    """
    started: queue.Queue[tuple[int, trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                serve = functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
                listeners = await nursery.start(serve)
                port = listeners[0].socket.getsockname()[1]
                started.put((port, trio.lowlevel.current_trio_token(), scope))

    thread = threading.Thread(target=trio.run, args=(main,), name=name)
    thread.start()
    port, token, scope = started.get(timeout=timeout)
    try:
        yield port
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout)


@contextmanager
def popen_until_healthy(
    command: list[str],
    base: str,
    log_path: Path,
    cwd: Path,
    timeout: float = 30.0,
    preexec_fn: Callable[[], object] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` (stderr to ``log_path``) until ``{base}/health`` answers 200.

    The synchronous twin of :func:`server_process`, for tests that drive a
    browser: SIGTERM (then SIGKILL after 15 s) on the way out, and the log's
    tail printed so a failing test shows it.  ``preexec_fn`` runs in the
    child before the server starts (a resource limit, say).

    Raises:
        AssertionError: the process exited, or ``/health`` did not answer
            within ``timeout``; the message carries the log.
    """
    import time
    import urllib.error
    import urllib.request

    with (
        log_path.open("wb") as log,
        subprocess.Popen(command, cwd=cwd, stderr=log, preexec_fn=preexec_fn) as proc,
    ):
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"server exited with {proc.returncode}:\n{log_path.read_text()}"
                    )
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=1) as reply:
                        if reply.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"server did not answer /health:\n{log_path.read_text()}")
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            print(f"--- server log (exit {proc.returncode}) ---\n{log_path.read_text()[-8000:]}")


def find_chromium() -> str | None:
    """``$PORTFOLIO_TEST_CHROMIUM``, /usr/bin/chromium, or chromium on PATH; None if none."""
    import shutil

    for candidate in (os.environ.get("PORTFOLIO_TEST_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def headless_browser(
    profile: Path, executable: str, args: list[str], viewport: dict[str, int] | None = None
) -> Iterator[object]:
    """A headless Chromium persistent context (playwright), closed on the way out.

    Typed ``object`` so that this module does not need playwright to import;
    callers annotate it as ``playwright.sync_api.BrowserContext``.

    Raises:
        ImportError: playwright is not installed (``pip install -e '.[test]'``).
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium
        if viewport is None:
            context = chromium.launch_persistent_context(
                str(profile), executable_path=executable, headless=True, args=args
            )
        else:
            width, height = viewport["width"], viewport["height"]
            context = chromium.launch_persistent_context(
                str(profile),
                executable_path=executable,
                headless=True,
                args=args,
                viewport={"width": width, "height": height},
            )
        try:
            yield context
        finally:
            context.close()
