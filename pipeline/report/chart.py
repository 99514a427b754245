"""Progress over time as an inline SVG line chart, laid out here and drawn by the template.

Completions per hour for each stage and language, and jobs failed per hour, counted from the
``events`` log (a move to ``completed`` or ``failed``). The time axis runs from the first to the
last such event, never to "now", so rebuilding an unchanged database gives the same bytes. When
the events span more than ``MAX_HOURLY_BUCKETS`` hours, buckets are days, so a long archive stays
readable at the page's width.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

from db_manager import COMPLETED, FAILED, TRANSCRIPTION

WIDTH, HEIGHT = 900, 260
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 12, 28
MAX_HOURLY_BUCKETS = 14 * 24
MAX_DOTTED_BUCKETS = 48
# Line colours, chosen to be told apart in print and by most colour-blind readers (Okabe-Ito).
PALETTE = ("#0072b2", "#009e73", "#e69f00", "#cc79a7", "#56b4e9", "#f0e442", "#000000")
FAILURE_COLOUR = "#d55e00"


@dataclass
class Series:
    label: str
    colour: str
    dashed: bool
    points: str          # SVG polyline points, "x,y x,y ..."
    total: int
    dots: list[tuple[float, float]]   # a marker per bucket when there are few (one bucket is no line)


@dataclass
class Chart:
    width: int
    height: int
    left: int
    top: int
    plot_width: int
    plot_height: int
    bucket: str          # "hour" or "day"
    series: list[Series]
    x_ticks: list[tuple[float, str, str]]      # x, label, text-anchor (the ends stay inside the chart)
    y_ticks: list[tuple[float, str]]

    @property
    def empty(self) -> bool:
        return not self.series


def build_chart(events, label_of) -> Chart:
    """``events``: objects with ``at``, ``job`` (``transcription`` or a language) and ``to_status``;
    ``label_of(job)`` names a series."""
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    done = [(e.at, e.job) for e in events if e.to_status == COMPLETED]
    failed = [e.at for e in events if e.to_status == FAILED]
    times = [at for at, _job in done] + failed
    if not times:
        return Chart(WIDTH, HEIGHT, LEFT, TOP, plot_width, plot_height, "hour", [], [], [])
    first_hour, last_hour = int(min(times) // 3600), int(max(times) // 3600)
    size = 3600 if last_hour - first_hour < MAX_HOURLY_BUCKETS else 86400
    first, last = int(min(times) // size), int(max(times) // size)
    buckets = last - first + 1
    counts: dict[str, Counter] = {}
    for at, job in done:
        counts.setdefault(job, Counter())[int(at // size) - first] += 1
    failures = Counter(int(at // size) - first for at in failed)
    peak = max([max(c.values()) for c in counts.values()] + [max(failures.values(), default=0), 1])
    top = _nice_ceiling(peak)

    def x(index: int) -> float:
        return round(LEFT + (plot_width * (index + 0.5) / buckets if buckets > 1 else plot_width / 2), 1)

    def y(value: int) -> float:
        return round(TOP + plot_height - plot_height * value / top, 1)

    def line(label: str, colour: str, dashed: bool, counter: Counter) -> Series:
        coords = [(x(i), y(counter.get(i, 0))) for i in range(buckets)]
        return Series(label, colour, dashed, " ".join(f"{a},{b}" for a, b in coords), sum(counter.values()),
                      coords if buckets <= MAX_DOTTED_BUCKETS else [])

    jobs = sorted(counts, key=lambda job: (job != TRANSCRIPTION, job))
    series = [line(label_of(job), PALETTE[n % len(PALETTE)], False, counts[job]) for n, job in enumerate(jobs)]
    if failures:
        series.append(line("jobs failed", FAILURE_COLOUR, True, failures))
    fmt = "%Y-%m-%d %H:00" if size == 3600 else "%Y-%m-%d"
    tick_indexes = sorted({0, buckets // 2, buckets - 1})
    anchors = {0: "start", buckets - 1: "end"} if buckets > 2 else {}
    x_ticks = [(x(i), time.strftime(fmt, time.gmtime((first + i) * size)), anchors.get(i, "middle"))
               for i in tick_indexes]
    y_ticks = [(y(v), str(v)) for v in sorted({0, top // 2, top})]
    return Chart(WIDTH, HEIGHT, LEFT, TOP, plot_width, plot_height, "hour" if size == 3600 else "day",
                 series, x_ticks, y_ticks)


def _nice_ceiling(value: int) -> int:
    """The next of 1, 2, 5 x 10^n at or above ``value``, an even number from 2 on (the middle tick is whole)."""
    magnitude = 10 ** int(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            nice = step * magnitude
            return nice if nice == 1 or nice % 2 == 0 else nice + 1
    return value
