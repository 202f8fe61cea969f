"""The replay market source: its file format, its clock, its loop, its fallback.

Rules of this suite: files live in ``tmp_path`` (or are text in memory);
expected prices are read from the CSV text the test wrote, never from the
code under test; the one outside-in test runs a whole server on 127.0.0.1,
port 0, against the harness's real redis-server with a real v2 WebSocket
client, every wait under ``fail_after``; the one child process (``serve``
with a bad file) has a timeout.
"""

from __future__ import annotations

import math
import os
import subprocess
import tomllib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_portfolio.config import (
    SAMPLE_PRICES_FILE,
    ConfigError,
    MarketSourceKind,
    Settings,
    load_settings,
)
from trio_portfolio.market import HISTORY_LENGTH, unpack_history
from trio_portfolio.replay import (
    MAX_LINE_BYTES,
    PAST_STEPS_LIMIT,
    PriceTape,
    ReplayFileError,
    ReplaySource,
    load_tape,
    main,
    market_source_for,
    parse_prices,
    sample_lines,
)
from trio_portfolio.simulation import GbmSimulator
from trio_portfolio.testing import RedisServerInfo
from trio_portfolio.testing.live_server import open_client, open_live_server
from trio_portfolio.testing.live_server import test_settings as server_settings
from trio_portfolio.testing.processes import CLI

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2024, 1, 2, 9, 30, tzinfo=UTC)


def stamp(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def csv_text(rows: Sequence[tuple[float, str, float]]) -> str:
    """``timestamp,ticker,price`` text with rows at ``T0 + seconds``."""
    lines = ["timestamp,ticker,price"]
    lines += [f"{stamp(s)},{ticker},{price!r}" for s, ticker, price in rows]
    return "\n".join(lines) + "\n"


def tape_of(text: str, max_rows: int = 1000) -> PriceTape:
    return parse_prices(text.splitlines(keepends=True), name="prices.csv", max_rows=max_rows)


def grid(steps: int, gap: float, tickers: dict[str, float]) -> list[tuple[float, str, float]]:
    """Every ticker at every step ``k`` (``k * gap`` seconds), priced ``base + k + 0.25``."""
    return [(k * gap, t, base + k + 0.25) for k in range(steps) for t, base in tickers.items()]


# -- the file format ---------------------------------------------------------------


GOOD = "timestamp,ticker,price\n2024-01-02T09:30:00Z,AAPL,190.5\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "prices.csv: empty; expected the header", id="empty"),
        pytest.param("\n\n", "prices.csv: empty", id="blank"),
        pytest.param(
            "2024-01-02T09:30:00Z,AAPL,1\n", "prices.csv:1: expected the header", id="no-header"
        ),
        pytest.param("time,ticker,price\n", "prices.csv:1: expected the header", id="bad-header"),
        pytest.param("timestamp,ticker,price\n", "prices.csv: no price rows", id="no-rows"),
        pytest.param(GOOD + "2024-01-02T09:31:00Z,AAPL\n", "prices.csv:3: expected 3", id="two"),
        pytest.param(GOOD + "2024-01-02T09:31:00Z,A,1,2\n", "prices.csv:3: expected 3", id="four"),
        pytest.param(GOOD + "yesterday,AAPL,1\n", "prices.csv:3: timestamp 'yesterday'", id="ts"),
        pytest.param(GOOD + "2024-01-02T09:31:00Z,aapl!,1\n", "prices.csv:3: 'aapl!'", id="bad"),
        pytest.param(GOOD + "2024-01-02T09:31:00Z,ABCDEFGHIJK,1\n", ":3: 'ABCDEFGHIJK'", id="long"),
        pytest.param(GOOD + "2024-01-02T09:31:00Z,,1\n", "prices.csv:3: '' is not", id="empty-t"),
        pytest.param(GOOD + "2024-01-02T09:31:00Z,AAPL,0\n", ":3: price '0' must be", id="zero"),
        pytest.param(GOOD + "2024-01-02T09:31:00Z,AAPL,-3.5\n", ":3: price '-3.5'", id="negative"),
        pytest.param(GOOD + "2024-01-02T09:31:00Z,AAPL,nan\n", ":3: price 'nan'", id="nan"),
        pytest.param(GOOD + "2024-01-02T09:31:00Z,AAPL,inf\n", ":3: price 'inf'", id="inf"),
        pytest.param(GOOD + "2024-01-02T09:31:00Z,AAPL,2e12\n", ":3: price '2e12'", id="huge"),
        pytest.param(GOOD + "2024-01-02T09:31:00Z,AAPL,ten\n", ":3: price 'ten' is not", id="text"),
        pytest.param(
            GOOD + "2024-01-02T09:29:59Z,AAPL,1\n",
            "prices.csv:3: timestamp 2024-01-02T09:29:59Z"
            " is earlier than the row before (2024-01-02T09:30:00Z): rows must be sorted",
            id="unsorted",
        ),
        pytest.param(
            GOOD + "2024-01-02T09:30:00Z,aapl,1\n", "prices.csv:3: AAPL has two rows", id="dup"
        ),
    ],
)
def test_bad_files_name_the_line_and_the_problem(text: str, message: str) -> None:
    with pytest.raises(ReplayFileError) as info:
        tape_of(text)
    assert message in str(info.value)


def test_an_unclosed_quote_is_not_taken_as_a_row() -> None:
    with pytest.raises(ReplayFileError, match="expected 3 fields"):
        tape_of(GOOD + '2024-01-02T09:31:00Z,"AAPL,1\n2024-01-02T09:32:00Z,AAPL,2\n')


def test_a_replay_file_error_is_a_config_error() -> None:
    assert issubclass(ReplayFileError, ConfigError)
    assert issubclass(ReplayFileError, ValueError)


def test_row_limit_names_the_setting() -> None:
    text = csv_text(grid(3, 1.0, {"AAPL": 100.0}))
    assert tape_of(text, max_rows=3).rows == 3
    with pytest.raises(
        ReplayFileError, match=r"prices\.csv:4: more than 2 rows .*--replay-max-rows"
    ):
        tape_of(text, max_rows=2)


def test_lenient_where_harmless() -> None:
    text = (
        "\ufeff Timestamp , TICKER , Price \n"  # a BOM survives only without utf-8-sig
        "\n"
        "2024-01-02T09:30:00,  aapl , 1.5\n"  # naive is UTC; blanks and case are ignored
        "2024-01-02T10:30:00+01:00,BRK.B,2\n"  # an offset: the same moment as above
        "\n"
        "2024-01-02 09:31:00.250000+00:00,AAPL,1e2\n"
    )
    tape = parse_prices(text.lstrip("\ufeff").splitlines(keepends=True), name="x", max_rows=10)
    assert tape.rows == 3
    assert sorted(tape.tapes) == ["AAPL", "BRK.B"]
    assert len(tape.step_micros) == 2
    assert tape.step_micros[1] - tape.step_micros[0] == 60_250_000
    assert tape.tapes["AAPL"].prices == (1.5, 100.0)


def test_load_tape_reads_utf8_with_bom_and_checks_size_first(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbf" + csv_text(grid(2, 1.0, {"AAPL": 1.0})).encode())
    assert load_tape(path, max_rows=2).rows == 2
    path.write_bytes(b"timestamp,ticker,price\n" + b" " * (2 * MAX_LINE_BYTES))
    with pytest.raises(
        ReplayFileError, match=rf"p\.csv: {2 * MAX_LINE_BYTES + 23} bytes, more than"
    ):
        load_tape(path, max_rows=2)


def test_load_tape_refuses_unreadable_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ReplayFileError, match=r"missing\.csv: cannot read replay file"):
        load_tape(tmp_path / "missing.csv", max_rows=10)
    with pytest.raises(ReplayFileError, match="cannot read replay file: Is a directory"):
        load_tape(tmp_path, max_rows=1000)
    binary = tmp_path / "b.csv"
    binary.write_bytes(GOOD.encode() + b"2024-01-02T09:31:00Z,AAPL,\xff\xfe\n")
    with pytest.raises(ReplayFileError, match=r"b\.csv:3: not UTF-8"):
        load_tape(binary, max_rows=10)


# -- the clock: ticks to replay time -------------------------------------------------


def test_start_is_the_middle_step_capped_by_the_history() -> None:
    assert tape_of(csv_text(grid(1, 1.0, {"A": 1.0}))).start_step == 0
    assert tape_of(csv_text(grid(2, 1.0, {"A": 1.0}))).start_step == 1
    assert tape_of(csv_text(grid(41, 1.0, {"A": 1.0}))).start_step == 20
    big = tape_of(csv_text(grid(600, 1.0, {"A": 1.0})))
    assert big.start_step == PAST_STEPS_LIMIT == HISTORY_LENGTH - 1


def test_each_tick_advances_interval_times_speed() -> None:
    # Steps 10 s apart; 2 s ticks at speed 2.5 are 5 s of replay a tick.
    source = ReplaySource(
        tape_of(csv_text(grid(40, 10.0, {"AAPL": 100.0}))), interval_seconds=2.0, speed=2.5
    )
    assert source.tape.start_step == 20
    assert source.replay_time(0) == stamp(200)
    assert source.replay_time(3) == stamp(215)
    expected = [20, 20, 21, 21, 22, 22, 23]
    assert [source.step_at_tick(n) for n in range(7)] == expected
    prices = [source.next_prices({"AAPL": 1.0}, n)["AAPL"] for n in range(7)]
    assert prices == [100.0 + k + 0.25 for k in expected]


def test_fast_speed_skips_steps_and_irregular_steps_hold() -> None:
    rows = [(s, "AAPL", float(s + 1)) for s in (0, 1, 2, 3, 10, 11, 30, 31)]
    source = ReplaySource(tape_of(csv_text(rows)), interval_seconds=0.5, speed=6.0)  # 3 s a tick
    assert source.tape.start_step == 4  # T_s = 10 s
    # r(N) = 10 + 3N: 10, 13, 16, 19, 22, 25, 28, 31 -> rows at 10, 11, 11, 11, 11, 11, 11, 31
    got = [source.next_prices({"AAPL": 1.0}, n)["AAPL"] for n in range(8)]
    assert got == [11.0, 12.0, 12.0, 12.0, 12.0, 12.0, 12.0, 32.0]


def test_sub_second_ticks_land_on_every_step_exactly() -> None:
    # 0.1 s is not exact in binary; time is kept in whole microseconds.
    source = ReplaySource(
        tape_of(csv_text(grid(2000, 0.1, {"AAPL": 100.0})), max_rows=2000),
        interval_seconds=0.1,
        speed=1.0,
    )
    start = source.tape.start_step
    steps = [source.step_at_tick(n) for n in range(2000 - start)]
    assert steps == list(range(start, 2000))


def test_end_of_file_loops_back_to_the_start_not_the_past() -> None:
    # 10 steps 1 s apart: start step 5; played span 4 s plus one step: a 5 s loop.
    source = ReplaySource(
        tape_of(csv_text(grid(10, 1.0, {"AAPL": 100.0}))), interval_seconds=1.0, speed=1.0
    )
    assert source.tape.loop_micros == 5_000_000
    assert [source.step_at_tick(n) for n in range(13)] == [5, 6, 7, 8, 9] * 2 + [5, 6, 7]
    assert source.replay_time(5) == source.replay_time(0) == stamp(5)
    assert source.next_prices({"AAPL": 1.0}, 5) == source.next_prices({"AAPL": 1.0}, 0)
    # Far ticks are still well defined (a long-running market's counter).
    assert source.step_at_tick(10**12 + 2) == 7


def test_a_one_step_file_plays_that_step_forever() -> None:
    source = ReplaySource(tape_of(GOOD), interval_seconds=1.0)
    assert source.tape.loop_micros == 0
    assert [source.next_prices({"AAPL": 5.0}, n) for n in (0, 1, 99)] == [{"AAPL": 190.5}] * 3
    assert source.bootstrap_history("AAPL", 3) == [190.5] * 3


def test_a_ticker_that_skips_steps_holds_and_one_that_starts_late_backfills() -> None:
    rows = [
        (0, "AAPL", 1.0),
        (1, "AAPL", 2.0),
        (2, "AAPL", 3.0),
        (3, "AAPL", 4.0),
        (3, "LATE", 40.0),
        (4, "AAPL", 5.0),
        (5, "AAPL", 6.0),
        (5, "LATE", 60.0),
    ]
    source = ReplaySource(tape_of(csv_text(rows)), interval_seconds=1.0)
    assert source.tape.start_step == 3
    assert source.initial_price("LATE") == 40.0
    assert source.bootstrap_history("LATE", 5) == [40.0] * 5  # before its first row: its first
    assert [source.next_prices({"LATE": 1.0}, n)["LATE"] for n in range(3)] == [40.0, 40.0, 60.0]


# -- the past --------------------------------------------------------------------------


def test_bootstrap_history_is_the_past_ending_at_the_initial_price() -> None:
    source = ReplaySource(
        tape_of(csv_text(grid(41, 1.0, {"AAPL": 100.0, "MSFT": 300.0}))), interval_seconds=1.0
    )
    past = [100.0 + k + 0.25 for k in range(21)]  # steps 0..20, the start is step 20
    assert source.initial_price("AAPL") == past[-1]
    assert source.bootstrap_history("AAPL", 5) == past[-5:]
    assert source.bootstrap_history("AAPL", 21) == past
    assert source.bootstrap_history("AAPL", 25) == [past[0]] * 4 + past  # padded, oldest first
    assert source.bootstrap_history("AAPL", 0) == []
    assert source.bootstrap_history("MSFT", 1) == [320.25]
    with pytest.raises(ValueError, match="length"):
        source.bootstrap_history("AAPL", -1)


def test_the_past_is_never_played() -> None:
    source = ReplaySource(
        tape_of(csv_text(grid(41, 1.0, {"AAPL": 100.0}))), interval_seconds=1.0, speed=1.0
    )
    past = set(source.bootstrap_history("AAPL", 20)[:-1])
    played = {source.next_prices({"AAPL": 1.0}, n)["AAPL"] for n in range(200)}
    assert played == {100.0 + k + 0.25 for k in range(20, 41)}
    assert not past & played


# -- tickers not in the file --------------------------------------------------------------


def test_unknown_tickers_move_by_the_fallback_simulator_unchanged_by_the_mix() -> None:
    simulator = GbmSimulator(seed=9)
    source = ReplaySource(
        tape_of(csv_text(grid(10, 1.0, {"AAPL": 100.0}))), interval_seconds=1.0, fallback=simulator
    )
    assert source.tickers == frozenset({"AAPL"})
    assert source.initial_price("ZZZQ") == simulator.initial_price("ZZZQ")
    assert source.bootstrap_history("ZZZQ", 30) == simulator.bootstrap_history("ZZZQ", 30)
    mixed = source.next_prices({"ZZZQ": 50.0, "AAPL": 1.0, "MSFT": 400.0}, 7)
    assert list(mixed) == ["ZZZQ", "AAPL", "MSFT"]  # the caller's order
    alone = simulator.next_prices({"ZZZQ": 50.0, "MSFT": 400.0}, 7)
    assert mixed == {"ZZZQ": alone["ZZZQ"], "AAPL": 107.25, "MSFT": alone["MSFT"]}
    assert source.next_prices({}, 3) == {}


def test_default_fallback_is_the_unseeded_simulator() -> None:
    source = ReplaySource(tape_of(GOOD), interval_seconds=1.0)
    assert source.initial_price("MSFT") == GbmSimulator().initial_price("MSFT")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(lambda s: s.next_prices({"AAPL": 1.0}, -1), "tick", id="negative-tick"),
        pytest.param(lambda s: s.next_prices({"AAPL": 0.0}, 1), "last price", id="zero-last"),
        pytest.param(lambda s: s.next_prices({"X": math.nan}, 1), "last price", id="nan-last"),
        pytest.param(lambda s: s.replay_time(-1), "tick", id="negative-time"),
    ],
)
def test_invalid_calls(call: object, match: str) -> None:
    source = ReplaySource(tape_of(GOOD), interval_seconds=1.0)
    with pytest.raises(ValueError, match=match):
        call(source)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("interval", "speed"), [(0.0, 1.0), (1.0, 0.0), (1.0, -2.0), (math.inf, 1.0), (1.0, math.nan)]
)
def test_invalid_interval_or_speed(interval: float, speed: float) -> None:
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        ReplaySource(tape_of(GOOD), interval_seconds=interval, speed=speed)


# -- settings and the factory -------------------------------------------------------------


def test_settings_default_to_the_simulator_and_the_bundled_sample() -> None:
    settings = Settings()
    assert settings.market_source is MarketSourceKind.SIMULATED
    assert settings.replay_file == SAMPLE_PRICES_FILE
    assert settings.replay_speed == 1.0
    source = market_source_for(Settings(market_seed=4))
    assert isinstance(source, GbmSimulator)
    assert source.seed == 4


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORTFOLIO_MARKET_SOURCE": "live"}, "PORTFOLIO_MARKET_SOURCE: expected one of simulated"),
        ({"PORTFOLIO_REPLAY_SPEED": "0"}, "PORTFOLIO_REPLAY_SPEED: expected a number > 0, got '0'"),
        ({"PORTFOLIO_REPLAY_SPEED": "-1"}, "PORTFOLIO_REPLAY_SPEED: expected a number > 0"),
        ({"PORTFOLIO_REPLAY_SPEED": "nan"}, "PORTFOLIO_REPLAY_SPEED: expected a number > 0"),
        ({"PORTFOLIO_REPLAY_FILE": ""}, "PORTFOLIO_REPLAY_FILE: expected a path"),
        ({"PORTFOLIO_REPLAY_MAX_ROWS": "0"}, "PORTFOLIO_REPLAY_MAX_ROWS: expected an integer > 0"),
    ],
)
def test_replay_settings_are_validated(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, env, None)
    assert message in str(info.value)


def test_factory_builds_a_replay_of_the_file_with_the_tick_interval(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(csv_text(grid(10, 1.0, {"AAPL": 100.0})), encoding="utf-8")
    settings = load_settings(
        {
            "market_source": "replay",
            "replay_file": str(path),
            "replay_speed": "4",
            "market_update_interval_seconds": "0.5",
            "metric_delay_seconds": "0,0",  # ticks faster than 2-5 s metrics: guarantee 8
            "market_seed": "3",
        },
        {},
        None,
    )
    source = market_source_for(settings)
    assert isinstance(source, ReplaySource)
    assert (source.interval_seconds, source.speed) == (0.5, 4.0)
    assert source.step_at_tick(1) == source.tape.start_step + 2  # 2 s of replay a tick
    assert source.initial_price("ZZZQ") == GbmSimulator(seed=3).initial_price("ZZZQ")
    with pytest.raises(ReplayFileError, match="more than 5 rows"):
        market_source_for(
            Settings(market_source=MarketSourceKind.REPLAY, replay_file=path, replay_max_rows=5)
        )


# -- the bundled sample and the tool --------------------------------------------------------


def test_the_sample_is_made_by_the_project_and_ships_as_package_data() -> None:
    assert SAMPLE_PRICES_FILE.read_text(encoding="utf-8") == "\n".join(sample_lines()) + "\n"
    source = market_source_for(Settings(market_source=MarketSourceKind.REPLAY))
    assert isinstance(source, ReplaySource)
    assert {"AAPL", "GOOGL", "MSFT"} <= source.tickers
    assert 300 <= source.tape.rows <= 1000
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    data = pyproject["tool"]["setuptools"]["package-data"]["trio_portfolio"]
    assert SAMPLE_PRICES_FILE.parent.name + "/*.csv" in data
    # At the default tick interval and speed, one step of the sample a tick.
    assert source.step_at_tick(1) == source.tape.start_step + 1


def test_tool_makes_the_sample_and_checks_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = tmp_path / "out" / "sample.csv"
    assert main(["--make-sample", str(made)]) == 0
    assert made.read_bytes() == SAMPLE_PRICES_FILE.read_bytes()
    assert main(["--check", str(made)]) == 0
    out = capsys.readouterr().out
    assert "800 rows, 200 steps" in out
    assert "loops every 3000 s" in out
    bad = tmp_path / "bad.csv"
    bad.write_text(GOOD + "2024-01-02T09:31:00Z,AAPL,-1\n", encoding="utf-8")
    assert main(["--check", str(bad)]) == 1
    assert "bad.csv:3: price '-1'" in capsys.readouterr().err


def test_serve_with_a_bad_replay_file_exits_with_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(GOOD + "2024-01-02T09:29:00Z,AAPL,1\n", encoding="utf-8")
    child = subprocess.run(
        [
            *CLI,
            "serve",
            "--port",
            "0",
            "--redis-url",
            "redis://127.0.0.1:1",  # never reached: the file is read first
            "--market-source",
            "replay",
            "--replay-file",
            str(bad),
            "--log-level",
            "error",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 1
    assert child.stderr.strip().splitlines()[-1] == (
        f"trio-portfolio: configuration error: {bad}:3: timestamp 2024-01-02T09:29:00Z is "
        "earlier than the row before (2024-01-02T09:30:00Z): rows must be sorted by time"
    )
    assert "Traceback" not in child.stderr


# -- from outside: a server replaying a file -------------------------------------------------


async def test_a_server_replays_the_file_into_sessions_and_the_store(
    real_redis: RedisServerInfo, tmp_path: Path
) -> None:
    bases = {"AAPL": 100.0, "GOOGL": 200.0, "MSFT": 300.0}
    path = tmp_path / "prices.csv"
    path.write_text(csv_text(grid(200, 1.0, bases)), encoding="utf-8")
    # 0.2 s ticks at speed 5: one 1 s step a tick; the play starts at step 100
    # and loops after 100 ticks (20 s), longer than this test runs.
    settings = server_settings(
        real_redis.url,
        market_source=MarketSourceKind.REPLAY,
        replay_file=path,
        replay_speed=5.0,
        market_update_interval_seconds=0.2,
    )
    start = 100

    def price(ticker: str, step: int) -> float:
        return bases[ticker] + step + 0.25

    async with open_live_server(settings) as server, open_client(server, "replay-1") as client:
        greeting = await client.recv()
        assert greeting["type"] == "session"
        updates = [
            f
            for f in await client.recv_until(lambda f: f["type"] == "market_update")
            if f["type"] == "market_update"
        ]
        while len(updates) < 6:
            updates.append(await client.recv())
        steps = []
        for update in updates:
            assert update["type"] == "market_update"
            step = round(update["prices"]["AAPL"] - 100.25)
            assert update["prices"] == {t: price(t, step) for t in bases}, update
            steps.append(step)
        assert steps == list(range(steps[0], steps[0] + 6))
        assert start < steps[0] < start + 90

        # The store: the tick counter, the prices and the history agree with the file.
        base = f"{settings.key_prefix}:{{market}}"
        with trio.fail_after(10):
            reply = await server.info.server.redis.pipeline(
                [
                    ["MULTI"],
                    ["GET", f"{base}:tick"],
                    ["HGETALL", f"{base}:prices"],
                    ["GET", f"{base}:history:AAPL"],
                    ["EXEC"],
                ]
            )
        tick_text, flat_prices, ring = reply[-1]
        tick = int(tick_text)
        assert 0 < tick < 100
        stored = {flat_prices[i]: float(flat_prices[i + 1]) for i in range(0, len(flat_prices), 2)}
        assert stored == {t: price(t, start + tick) for t in bases}
        past = [price("AAPL", k) for k in range(start + 1)]
        bootstrap = [past[0]] * (HISTORY_LENGTH - len(past)) + past
        played = [price("AAPL", start + n) for n in range(1, tick + 1)]
        # The history is a ring: tick t's price at slot t mod length (market_data's layout).
        slots = unpack_history(ring)
        newest = tick % len(slots)
        assert [*slots[newest + 1 :], *slots[: newest + 1]] == (bootstrap + played)[
            -HISTORY_LENGTH:
        ]


def test_csv_errors_name_the_line() -> None:
    huge = '2024-01-02T09:31:00Z,"' + "A" * 200_000 + '",1\n'
    with pytest.raises(ReplayFileError, match=r"prices\.csv:3: not CSV: field larger"):
        tape_of(GOOD + huge)


# -- the documented adapter skeleton runs as written ------------------------------------------


def _skeleton_code() -> str:
    text = (REPO / "docs" / "market-feeds.md").read_text(encoding="utf-8")
    blocks = text.split("```python\n")[1:]
    (code,) = [b.split("```")[0] for b in blocks if "class StreamingFeedSource" in b]
    return code


async def test_the_documented_adapter_skeleton_works_against_an_in_memory_feed() -> None:
    send, receive = trio.open_memory_channel[dict[str, float]](0)

    @asynccontextmanager
    async def open_feed(url: str) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, float]]]:
        assert url == "feed://test"
        yield receive

    namespace: dict[str, Any] = {
        "open_feed": open_feed,
        "FeedError": type("FeedError", (Exception,), {}),
    }
    exec(compile(_skeleton_code(), "docs/market-feeds.md", "exec"), namespace)
    simulator = GbmSimulator(seed=1)
    source = namespace["StreamingFeedSource"]("feed://test", simulator, max_tickers=2)
    assert source.bootstrap_history("AAPL", 3) == simulator.bootstrap_history("AAPL", 3)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        with trio.fail_after(5):
            await send.send({"AAPL": 191.5, "bad!": 3.0, "MSFT": math.nan})
            await send.send({"GOOGL": 170.25})
            await send.send({"TSLA": 200.0})  # a third ticker: over max_tickers, dropped
            await send.send({"GOOGL": 171.0})
            await send.send({})  # unbuffered: taken only once the batch before is merged
        got = await trio.to_thread.run_sync(
            source.next_prices, {"AAPL": 190.0, "MSFT": 400.0, "GOOGL": 1.0, "TSLA": 9.0}, 1
        )
        assert got == {"AAPL": 191.5, "MSFT": 400.0, "GOOGL": 171.0, "TSLA": 9.0}
        assert source.bootstrap_history("AAPL", 2) == [191.5, 191.5]
        nursery.cancel_scope.cancel()
