"""Historical prices played back as a market: :class:`ReplaySource`.

Theory of operation
-------------------
A replay file is CSV text (UTF-8) with the header ``timestamp,ticker,price``
and one price per row::

    timestamp,ticker,price
    2024-07-01T13:30:00Z,AAPL,190.00
    2024-07-01T13:30:00Z,MSFT,420.00
    2024-07-01T13:30:30Z,AAPL,190.41

Timestamps are ISO-8601 (without an offset they are taken as UTC), rows are
sorted by time (equal timestamps allowed), tickers follow the contract
(``^[A-Z][A-Z0-9.\\-]{0,9}$`` after stripping and upper-casing, as
``set_holdings`` does) and prices are finite numbers in (0,
:data:`~trio_portfolio.simulation.PRICE_CEILING`].  Blank lines are skipped.
Anything else is a :class:`ReplayFileError` naming ``file:line``; the first
problem stops the load.  The file is bounded: at most ``max_rows`` rows
(``--replay-max-rows``) and, checked before reading, at most
``max_rows * MAX_LINE_BYTES`` bytes.

Rows with the same timestamp form one *step*; steps ``0 .. n-1`` are the
file's distinct timestamps ``T_0 < ... < T_{n-1}``.  A ticker's price at a
time ``r`` is its last row at or before ``r`` (before its first row: its
first row's price), so a ticker may skip steps.  Two rows of one ticker in
one step are an error.

The past and the play.  The first ``s = min(n // 2, PAST_STEPS_LIMIT)``
steps are the *past*: the replay starts at ``S = T_s``, so every ticker's
:meth:`~ReplaySource.initial_price` is its price at ``S`` and its
:meth:`~ReplaySource.bootstrap_history` is its prices at steps
``s-L+1 .. s`` (left-padded with the oldest of them when the file has fewer
than ``L`` steps up to ``S``), ending exactly at the initial price.

Ticks to replay time.  The market counts ticks (tick 0 is the start; the
first live tick is 1).  Tick ``N`` plays the prices at replay time::

    r(N) = S + (round(N · interval · speed · 10⁶) µs  mod  P)

where ``interval`` is ``--market-update-interval-seconds`` and ``speed``
(``--replay-speed``) is replay seconds per wall-clock second: at speed 1 the
file plays in real time, at speed 60 one minute of it per second.  Time is
a function of the tick number, never of the clock, so a late tick skips no
rows and every process (and a restarted one) agrees on the prices of a
tick.  Several steps may fall between two ticks (only the last one is
seen), or several ticks within one step (the prices hold).

End of file: the replay *loops*.  The loop period is the played span plus
one step, ``P = (T_{n-1} - S) + (T_{n-1} - T_{n-2})``, so the last step is
held as long as the one before it and the play then starts again at ``S``
(the past is never replayed).  The wrap is one artificial price move, from
the last prices back to the start prices.  A file of one step plays that
step forever.

Tickers not in the file move by the ``fallback`` source (the server uses
``GbmSimulator(seed=market_seed)``), so a portfolio may hold any ticker;
:attr:`ReplaySource.tickers` says which ones are replayed.  The simulator's
prices of one ticker never depend on the other tickers, so mixing the two
changes none of them.

A ticker enters the market when a session first holds it, and at that moment
gets the start price (the interface has no tick for
:meth:`~ReplaySource.initial_price`); if it enters after tick 0, it takes the
replayed price of the next tick, one jump.

Purity and threads: parsing happens once, in :func:`load_tape` (the server
calls :func:`market_source_for` in a worker thread during start-up, before
the market updater runs); afterwards a :class:`ReplaySource` is immutable,
does no I/O, and is safe to call from several worker threads at once.

``python3 -m trio_portfolio.replay --make-sample`` rewrites the bundled
sample (:data:`~trio_portfolio.config.SAMPLE_PRICES_FILE`) from the project's
own :class:`~trio_portfolio.simulation.GbmSimulator`; ``--check FILE``
validates a file and summarises it.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Final

import attrs

from trio_portfolio.config import (
    SAMPLE_PRICES_FILE,
    ConfigError,
    MarketSourceKind,
    Settings,
)
from trio_portfolio.protocol import ProtocolError, normalise_ticker
from trio_portfolio.simulation import PRICE_CEILING, GbmSimulator, MarketSource

HEADER: Final[tuple[str, str, str]] = ("timestamp", "ticker", "price")
"""The required header row (case and surrounding blanks are ignored)."""

MAX_LINE_BYTES: Final[int] = 128
"""Bytes allowed per row on average: the file may hold ``max_rows * MAX_LINE_BYTES``."""

PAST_STEPS_LIMIT: Final[int] = 255
"""At most this many leading steps are the past (``market.HISTORY_LENGTH - 1``)."""

_EPOCH: Final[datetime] = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO: Final[timedelta] = timedelta(microseconds=1)
_PER_SECOND: Final[int] = 1_000_000


class ReplayFileError(ConfigError):
    """A replay file cannot be used; the message starts with ``file:line:`` (or ``file:``)."""


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (naive moments are UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MICRO


def _iso(micros: int) -> str:
    return (_EPOCH + micros * _MICRO).isoformat().replace("+00:00", "Z")


@attrs.frozen
class TickerTape:
    """One ticker's rows: the steps it has a price in (ascending) and those prices."""

    steps: tuple[int, ...]
    prices: tuple[float, ...]

    def price_at_step(self, step: int) -> float:
        """Its last price at or before ``step``; before its first row, its first price."""
        index = bisect.bisect_right(self.steps, step) - 1
        return self.prices[max(index, 0)]


@attrs.frozen
class PriceTape:
    """A parsed replay file: its steps, its tickers' rows, its past and its loop.

    Build one with :func:`parse_prices` or :func:`load_tape`; the attributes
    follow the module docstring (``start_step`` is ``s``, ``loop_micros`` is
    ``P``, 0 for a file of one step).
    """

    name: str
    step_micros: tuple[int, ...]
    tapes: Mapping[str, TickerTape]
    rows: int

    @property
    def start_step(self) -> int:
        return min(len(self.step_micros) // 2, PAST_STEPS_LIMIT)

    @property
    def loop_micros(self) -> int:
        times = self.step_micros
        if len(times) < 2:
            return 0
        return (times[-1] - times[self.start_step]) + (times[-1] - times[-2])

    def step_at_offset(self, offset_micros: int) -> int:
        """The step playing ``offset_micros`` after the start, the loop applied."""
        start = self.start_step
        period = self.loop_micros
        if period == 0:
            return start
        moment = self.step_micros[start] + offset_micros % period
        return bisect.bisect_right(self.step_micros, moment) - 1

    def summary(self) -> str:
        """One line for people: rows, steps, tickers, the start and the loop."""
        times = self.step_micros
        start = self.start_step
        return (
            f"{self.name}: {self.rows} rows, {len(times)} steps from {_iso(times[0])} "
            f"to {_iso(times[-1])}, tickers {', '.join(sorted(self.tapes))}; "
            f"play starts at step {start} ({_iso(times[start])}) and loops every "
            f"{self.loop_micros / _PER_SECOND:g} s of replay time"
        )


def _parse_price(text: str) -> float:
    try:
        price = float(text)
    except ValueError:
        raise ValueError(f"price {text.strip()!r} is not a number") from None
    if not (math.isfinite(price) and 0.0 < price <= PRICE_CEILING):
        raise ValueError(
            f"price {text.strip()!r} must be a finite number > 0 and <= {PRICE_CEILING:g}"
        )
    return price


def _parse_time(text: str) -> int:
    try:
        return _micros(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ValueError(f"timestamp {text.strip()!r} is not ISO-8601") from None


def parse_prices(lines: Iterable[str], *, name: str, max_rows: int) -> PriceTape:
    """Parse replay CSV text (an iterable of lines, as a text file is).

    ``name`` prefixes every error (``name:line: problem``).  Raises
    :class:`ReplayFileError` for a missing or wrong header, a row that is
    not three fields, a bad timestamp, ticker or price, a row earlier than
    the one before it, a ticker twice in one step, more than ``max_rows``
    rows, or no rows at all.
    """
    if max_rows <= 0:
        raise ValueError(f"max_rows must be > 0, got {max_rows!r}")
    reader = csv.reader(lines)
    header: list[str] | None = None
    step_micros: list[int] = []
    steps: dict[str, list[int]] = {}
    prices: dict[str, list[float]] = {}
    rows = 0
    try:
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = [field.strip().lower() for field in row]
                if tuple(header) != HEADER:
                    raise ReplayFileError(
                        f"{name}:{line}: expected the header {','.join(HEADER)}, "
                        f"got {','.join(row)!r}"
                    )
                continue
            rows += 1
            if rows > max_rows:
                raise ReplayFileError(
                    f"{name}:{line}: more than {max_rows} rows (the limit, --replay-max-rows)"
                )
            if len(row) != 3:
                raise ReplayFileError(
                    f"{name}:{line}: expected 3 fields timestamp,ticker,price, got {len(row)}"
                )
            try:
                moment = _parse_time(row[0])
                ticker = normalise_ticker(row[1])
                price = _parse_price(row[2])
            except ProtocolError as exc:
                raise ReplayFileError(f"{name}:{line}: {exc.detail}") from None
            except ValueError as exc:
                raise ReplayFileError(f"{name}:{line}: {exc}") from None
            if step_micros and moment < step_micros[-1]:
                raise ReplayFileError(
                    f"{name}:{line}: timestamp {row[0].strip()} is earlier than the row before "
                    f"({_iso(step_micros[-1])}): rows must be sorted by time"
                )
            if not step_micros or moment > step_micros[-1]:
                step_micros.append(moment)
            step = len(step_micros) - 1
            own = steps.setdefault(ticker, [])
            if own and own[-1] == step:
                raise ReplayFileError(f"{name}:{line}: {ticker} has two rows at {row[0].strip()}")
            own.append(step)
            prices.setdefault(ticker, []).append(price)
    except csv.Error as exc:
        raise ReplayFileError(f"{name}:{reader.line_num}: not CSV: {exc}") from None
    if header is None:
        raise ReplayFileError(f"{name}: empty; expected the header {','.join(HEADER)}")
    if rows == 0:
        raise ReplayFileError(f"{name}: no price rows after the header")
    tapes = {t: TickerTape(tuple(steps[t]), tuple(prices[t])) for t in steps}
    return PriceTape(
        name=name, step_micros=tuple(step_micros), tapes=MappingProxyType(tapes), rows=rows
    )


def load_tape(path: Path, *, max_rows: int) -> PriceTape:
    """Read and parse a replay file: blocking I/O, call it from a worker thread.

    The size is checked first (at most ``max_rows * MAX_LINE_BYTES`` bytes),
    so a huge file is refused before it is read.  Raises
    :class:`ReplayFileError` (also for a file that cannot be opened).
    """
    limit = max_rows * MAX_LINE_BYTES
    try:
        size = path.stat().st_size
        if size > limit:
            raise ReplayFileError(
                f"{path}: {size} bytes, more than {limit} "
                f"(--replay-max-rows {max_rows} x {MAX_LINE_BYTES} bytes a row)"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ReplayFileError(f"{path}: cannot read replay file: {exc.strerror}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
    return parse_prices(_decoded(data, str(path)), name=str(path), max_rows=max_rows)


def _decoded(data: bytes, name: str) -> Iterator[str]:
    """``data``'s lines as text, a line that is not UTF-8 named by its number."""
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ReplayFileError(f"{name}:{number}: not UTF-8 text") from None


class ReplaySource(MarketSource):
    """A :class:`~trio_portfolio.simulation.MarketSource` that plays a :class:`PriceTape`.

    ``interval_seconds`` (the market tick interval) and ``speed`` (replay
    seconds per wall-clock second) are finite numbers > 0; ``fallback``
    prices tickers not in the file.  Immutable, pure and thread-safe; see
    the module docstring for the mapping of ticks to replay time, the loop
    and the bootstrap history.  Invalid arguments raise :class:`ValueError`.
    """

    def __init__(
        self,
        tape: PriceTape,
        *,
        interval_seconds: float,
        speed: float = 1.0,
        fallback: MarketSource | None = None,
    ) -> None:
        for label, value in (("interval_seconds", interval_seconds), ("speed", speed)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{label} must be a finite number > 0, got {value!r}")
        self.tape = tape
        self.interval_seconds = float(interval_seconds)
        self.speed = float(speed)
        self.fallback: MarketSource = GbmSimulator() if fallback is None else fallback
        self._micros_per_tick = self.interval_seconds * self.speed * _PER_SECOND

    @property
    def tickers(self) -> frozenset[str]:
        """The tickers the file prices; any other is priced by the fallback."""
        return frozenset(self.tape.tapes)

    def _offset(self, tick: int) -> int:
        """Replay microseconds after the start at tick ``tick``, before the loop."""
        if tick < 0:
            raise ValueError(f"tick must be >= 0, got {tick!r}")
        return round(tick * self._micros_per_tick)

    def step_at_tick(self, tick: int) -> int:
        """The file step whose prices tick ``tick`` plays (``ValueError`` if negative)."""
        return self.tape.step_at_offset(self._offset(tick))

    def replay_time(self, tick: int) -> str:
        """``r(tick)`` as ISO-8601 UTC: the replay moment tick ``tick`` plays."""
        tape = self.tape
        offset = self._offset(tick)
        start = tape.step_micros[tape.start_step]
        return _iso(start + (offset % tape.loop_micros if tape.loop_micros else 0))

    def initial_price(self, ticker: str) -> float:
        tape = self.tape.tapes.get(ticker)
        if tape is None:
            return self.fallback.initial_price(ticker)
        return tape.price_at_step(self.tape.start_step)

    def bootstrap_history(self, ticker: str, length: int) -> list[float]:
        """The ticker's prices at the steps up to the start (padded); see the module docstring."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length!r}")
        tape = self.tape.tapes.get(ticker)
        if tape is None:
            return self.fallback.bootstrap_history(ticker, length)
        if length == 0:
            return []
        start = self.tape.start_step
        first = max(0, start - length + 1)
        past = [tape.price_at_step(step) for step in range(first, start + 1)]
        return [past[0]] * (length - len(past)) + past

    def next_prices(self, last_prices: Mapping[str, float], tick: int) -> dict[str, float]:
        """Replayed tickers: the file's price at ``r(tick)``; others: the fallback's.

        A replayed ticker's last price is checked but not used (the file
        says where it is).  Keys keep the order of ``last_prices``.
        """
        step = self.step_at_tick(tick)
        others: dict[str, float] = {}
        for ticker, last in last_prices.items():
            if not (math.isfinite(last) and last > 0):
                raise ValueError(
                    f"last price of {ticker!r} must be a finite number > 0, got {last!r}"
                )
            if ticker not in self.tape.tapes:
                others[ticker] = last
        moved = self.fallback.next_prices(others, tick) if others else {}
        return {
            ticker: moved[ticker]
            if ticker in moved
            else self.tape.tapes[ticker].price_at_step(step)
            for ticker in last_prices
        }


def market_source_for(settings: Settings) -> MarketSource:
    """The source ``settings`` ask for: the simulator, or a replay of ``replay_file``.

    A replay reads its file here (blocking: the server calls this in a
    worker thread before the market updater starts) and falls back to the
    simulator, seeded with ``market_seed``, for tickers not in the file.
    Raises :class:`ReplayFileError` for an unusable file.
    """
    simulator = GbmSimulator(seed=settings.market_seed)
    if settings.market_source is MarketSourceKind.SIMULATED:
        return simulator
    tape = load_tape(settings.replay_file, max_rows=settings.replay_max_rows)
    return ReplaySource(
        tape,
        interval_seconds=settings.market_update_interval_seconds,
        speed=settings.replay_speed,
        fallback=simulator,
    )


# -- the bundled sample ----------------------------------------------------------

SAMPLE_TICKERS: Final[tuple[str, ...]] = ("AAPL", "GOOGL", "MSFT", "AMZN")
SAMPLE_STEPS: Final[int] = 200
SAMPLE_START: Final[datetime] = datetime(2024, 7, 1, 13, 30, tzinfo=UTC)
SAMPLE_STEP_SECONDS: Final[int] = 30
"""One row per ticker every 30 s: at the default tick interval and speed 1, one step a tick."""
SAMPLE_SEED: Final[int] = 2024


def sample_lines(
    tickers: Sequence[str] = SAMPLE_TICKERS,
    steps: int = SAMPLE_STEPS,
    seed: int = SAMPLE_SEED,
) -> list[str]:
    """The sample file's lines: ``GbmSimulator(seed)`` ticks, rounded to cents.

    Step 0 is each ticker's initial price; step ``k`` is the simulator's
    tick ``k`` from the previous *rounded* price, so the file is its own
    complete record.  Timestamps start at :data:`SAMPLE_START`, one step
    every :data:`SAMPLE_STEP_SECONDS` seconds.
    """
    simulator = GbmSimulator(seed=seed)
    prices = {t: round(simulator.initial_price(t), 2) for t in tickers}
    lines = [",".join(HEADER)]
    for step in range(steps):
        if step:
            prices = {t: round(p, 2) for t, p in simulator.next_prices(prices, step).items()}
        moment = (SAMPLE_START + timedelta(seconds=step * SAMPLE_STEP_SECONDS)).isoformat()
        stamp = moment.replace("+00:00", "Z")
        lines += [f"{stamp},{t},{prices[t]:.2f}" for t in tickers]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``--make-sample [PATH]`` writes the sample; ``--check FILE`` validates a file."""
    parser = argparse.ArgumentParser(
        prog="python3 -m trio_portfolio.replay",
        description="Replay files for --market-source replay.",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--make-sample",
        nargs="?",
        const=str(SAMPLE_PRICES_FILE),
        metavar="PATH",
        help=f"write the sample made by GbmSimulator (default: {SAMPLE_PRICES_FILE})",
    )
    group.add_argument("--check", metavar="FILE", help="validate a replay file and summarise it")
    parser.add_argument(
        "--max-rows", type=int, default=Settings().replay_max_rows, help="row limit for --check"
    )
    args = parser.parse_args(argv)
    if args.make_sample is not None:
        path = Path(args.make_sample)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(sample_lines()) + "\n", encoding="utf-8")
        print(f"wrote {path}")
        return 0
    try:
        tape = load_tape(Path(args.check), max_rows=args.max_rows)
    except ReplayFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(tape.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
