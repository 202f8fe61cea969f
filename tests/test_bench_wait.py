"""bench/bench_wait.py still runs: WAIT off and on, tiny load, finite figures.

Nothing here asserts a time or a rate (figures depend on the machine); only
that both modes complete every analysis and that, with WAIT on, every
result was written and waited for and the one replica acknowledged it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_wait.py"


@pytest.mark.skipif(not Path("/usr/bin/redis-server").exists(), reason="needs redis-server")
def test_bench_wait_prints_both_modes() -> None:
    argv = [sys.executable, str(BENCH), "--clients", "2", "--analyses", "2", "--rounds", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, capture_output=True, check=False, timeout=180, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    figures = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert figures["off_results"] == figures["on_results"] == 2 * 2 * 5
    assert figures["wait_waits"] == figures["wait_acknowledged"] == 20
    assert figures["wait_short"] == 0
    assert all(math.isfinite(v) for v in figures.values() if isinstance(v, float))
