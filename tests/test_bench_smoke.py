"""The benchmark harness still runs: bench/loadgen.py and bench/compare.py on tiny loads.

Rules: real redis-servers and real WebSocket clients on localhost, ports
picked by the OS.  Nothing here asserts a time or a rate (figures depend on
the machine); only that every scenario completes, counts what it was asked
to do, reports finite figures and sees no interleaving.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import trio

from trio_portfolio.testing import RedisServerInfo, live

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen.py"
COMPARE = ROOT / "bench" / "compare.py"

TINY = {
    "throughput": ["--sessions", "3", "--analyses", "2"],
    "switch": ["--connections", "3", "--rounds", "2"],
    "idle": ["--connections", "5", "--warmup", "2"],
}
COUNTS = {"throughput": ("analyses", 6), "switch": ("rounds", 6), "idle": ("connections", 5)}


async def test_loadgen_scenarios_against_a_live_server(real_redis: RedisServerInfo) -> None:
    async with live(real_redis, metric_delay_seconds=(0.0, 0.0)) as server:
        for scenario, extra in TINY.items():
            url = f"ws://127.0.0.1:{server.port}"
            argv = [
                sys.executable,
                str(LOADGEN),
                scenario,
                "--url",
                url,
                "--server-pid",
                str(os.getpid()),
            ]
            argv += ["--settle", "0", *extra]
            with trio.fail_after(60):
                done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
            figures = json.loads(done.stdout.decode().strip().splitlines()[-1])
            key, count = COUNTS[scenario]
            assert figures["scenario"] == scenario
            assert figures[key] == count, figures
            assert all(math.isfinite(v) for v in figures.values() if isinstance(v, float))
            if scenario == "switch":
                assert figures["interleavings"] == 0, figures


def test_compare_prints_medians_and_ratios() -> None:
    argv = [sys.executable, str(COMPARE), "--a-path", str(ROOT), "--b-path", str(ROOT)]
    argv += ["--runs", "1", "--scenarios", "throughput", "--sessions", "2", "--analyses", "2"]
    done = subprocess.run(argv, capture_output=True, check=False, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    out = done.stdout.decode()
    assert "run 1 A throughput" in out, out
    assert "run 1 B throughput" in out, out
    row = next(line for line in out.splitlines() if "CPU ms/analysis" in line)
    assert len(row.split()) >= 4, row
