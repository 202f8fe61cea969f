"""``trio-portfolio demo``: the original service's demo, replayed against a running server.

Connects in dialect v2 (so every event is visible), asks for AAPL, switches
to GOOGL after two AAPL results, and prints each frame as it arrives until
the GOOGL analysis completes.  It checks the guarantee it demonstrates:
after the first GOOGL frame, no AAPL result may arrive; a violation makes
the command exit 1.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import orjson
import trio
from trio_websocket import open_websocket_url

from trio_portfolio.protocol import SUBPROTOCOL_V2

DEFAULT_URL = "ws://127.0.0.1:8000/ws/"


def _line(frame: dict[str, Any]) -> str:
    kind = frame.get("type")
    if kind == "analysis_result":
        return f"  <- {frame['ticker']:>6} | {frame['metric']:>17} = {frame['value']:+.4f}"
    if kind == "error":
        return f"  <- error [{frame.get('code')}]: {frame.get('detail')}"
    if kind == "session":
        holdings = frame["portfolio"]["holdings"]
        return f"  <- session {frame['session_id']}: holdings {holdings}"
    if kind == "market_update":
        return f"  <- market update: total value {frame['total_value']:,.2f}"
    rest = {k: v for k, v in frame.items() if k != "type"}
    return f"  <- {kind}: {rest}"


async def run_demo(
    url: str | None, *, timeout: float = 60.0, out: Callable[[str], None] = print
) -> int:
    """Run the demo; return the process exit code (0 if the switch was clean)."""
    target = url or DEFAULT_URL + "demo-" + secrets.token_hex(4)
    if target.endswith("/ws/"):
        target += "demo-" + secrets.token_hex(4)
    out(f"Connecting to {target} ...")
    with trio.fail_after(timeout):
        async with open_websocket_url(target, subprotocols=[SUBPROTOCOL_V2]) as ws:
            out("Connected!\n")
            out(">>> Sending: analyze AAPL")
            await ws.send_message(orjson.dumps({"action": "analyze", "ticker": "AAPL"}).decode())
            aapl_results = googl_results = 0
            switched = seen_googl = False
            violations = 0
            while True:
                frame = orjson.loads(await ws.get_message())
                out(_line(frame))
                kind, ticker = frame.get("type"), frame.get("ticker")
                if ticker == "GOOGL":
                    seen_googl = True
                if kind == "analysis_result" and ticker == "AAPL":
                    aapl_results += 1
                    if seen_googl:
                        violations += 1
                        out("  !! AAPL result after the first GOOGL frame")
                if kind == "analysis_result" and ticker == "GOOGL":
                    googl_results += 1
                if not switched and aapl_results >= 2:
                    switched = True
                    out("\n>>> Switching: analyze GOOGL (cancel-on-switch)")
                    await ws.send_message(
                        orjson.dumps({"action": "analyze", "ticker": "GOOGL"}).decode()
                    )
                if kind == "analysis_complete" and ticker == "GOOGL":
                    break
    out(
        f"\nDone: received {googl_results} GOOGL results; "
        f"{violations if violations else 'no'} AAPL results after the switch."
    )
    return 1 if violations else 0
