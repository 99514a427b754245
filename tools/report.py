#!/usr/bin/env python3
"""See the archive in a browser: write a static HTML report of the job database and the outputs.

The report folder is self-contained (no network, no CDN): open its index.html from disk or serve it
with any web server, or copy it to an intranet. The dashboard shows the numbers of tools/status.py
per stage and language, audio hours and cost, progress per hour from the event log, failures by
reason with the command that retries them, and every interview in a table that filters and sorts.
Each interview has a page: a player for the original media, the transcript as timed cues (click one
to play from there) with the translations beside it, the job history and links to every output.

The database is opened read-only. A rebuild writes only pages whose content changed, so --watch N
(rebuild every N seconds until Ctrl-C) is cheap. Media links are relative to the report folder;
--copy-media puts a copy of each media file in <out>/media/ instead, for a report that moves.
The default folder is ./report, beside the default ./output rather than inside the output root,
where tools/check_missing_transcripts.py would report it as an unknown folder.

Exit codes: 0 report written, 2 usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from pipeline import config
from pipeline.settings import Settings
from pipeline.report import BuildResult, ReportOptions, build
from tools.status import LANGUAGE_NAMES, summary

log = logging.getLogger("verbatim.report")

DEFAULT_OUT = "report"


def build_once(options: ReportOptions) -> BuildResult:
    """Open the database read-only, build the report once, close the database."""
    db = config.open_db(options.db_path, read_only=True)
    try:
        return build(db, summary(db, list(options.languages)), options, LANGUAGE_NAMES)
    finally:
        db.close_all()


def watch(options: ReportOptions, every: float, *, sleep=time.sleep, iterations: int | None = None,
          on_build=None) -> None:
    """Wait ``every`` seconds and rebuild, ``iterations`` times (forever when None), until Ctrl-C.

    A failed rebuild (the database briefly unreadable, a disk hiccup) is logged and the next one
    tried: a watcher should outlive a hiccup. Ctrl-C (KeyboardInterrupt) ends the loop."""
    done = 0
    while iterations is None or done < iterations:
        sleep(every)
        done += 1
        try:
            result = build_once(options)
        except (config.ConfigError, OSError) as exc:
            log.error("report build failed: %s", exc)
            continue
        if on_build:
            on_build(result)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = config.make_parser(
        __doc__, "python tools/report.py --db verbatim.db --output-dir output --out report && "
                 "xdg-open report/index.html\n  python tools/report.py --watch 60 --quiet")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                        help=f"report folder to write (default: ./{DEFAULT_OUT})")
    parser.add_argument("--copy-media", action="store_true",
                        help="copy each media file into <out>/media/ and play that copy")
    parser.add_argument("--watch", type=_seconds, metavar="N", help="rebuild every N seconds until Ctrl-C")
    parser.add_argument("--quiet", action="store_true", help="no summary line, warnings only")
    config.add_common_args(parser)
    return parser


def _print(result: BuildResult, args) -> None:
    if args.json:
        print(json.dumps({"out": result.out_dir, "index": str(Path(result.out_dir) / "index.html"),
                          "interviews": result.interviews, "rendered": result.rendered,
                          "written": result.written, "removed": result.removed, "seconds": result.seconds},
                         ensure_ascii=True), flush=True)
    elif not args.quiet:
        print(f"report: {result.interviews} interviews, {len(result.written)} file(s) written, "
              f"{result.seconds:.2f} s -> {Path(result.out_dir) / 'index.html'}", flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.load(args)
    config.setup_logging(settings.debug, args.quiet)
    options = ReportOptions(settings.db, settings.output_dir, args.out, args.copy_media,
                            languages=settings.target_languages)
    _print(build_once(options), args)  # a first build that fails is a usage error: exit 2
    if args.watch:
        watch(options, args.watch, on_build=lambda result: _print(result, args))
    return config.EXIT_OK


if __name__ == "__main__":
    config.run_main(main)
