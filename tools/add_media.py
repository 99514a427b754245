#!/usr/bin/env python3
"""Register audio and video files (files or folders, recursively) in the job store.

Each new file gets a transcription job and a translation job per target language
($VERBATIM_TARGET_LANGUAGES, default en,de,he). Re-running is idempotent and fast: unchanged
files (same path, size and mtime) are not hashed again.
"""

import json
import os
import sys

from pipeline import config
from pipeline.settings import Settings
from pipeline.media import describe, register_inputs


def main(argv=None) -> int:
    parser = config.make_parser(__doc__, "python tools/add_media.py /archive/interviews --db archive.db")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="media files or folders")
    parser.add_argument("--language", nargs="+", metavar="CODE",
                        help="target languages for translation jobs (default: $VERBATIM_TARGET_LANGUAGES)")
    config.add_common_args(parser)
    args = parser.parse_args(argv)
    settings = Settings.load(args, target_languages=args.language)
    config.setup_logging(settings.debug)
    languages = list(settings.target_languages)  # --language, else $VERBATIM_TARGET_LANGUAGES, as codes
    missing = [path for path in args.paths if not os.path.exists(path)]
    if missing:  # before the database is opened: a typo creates nothing and registers nothing
        raise config.ConfigError("input not found: " + ", ".join(map(repr, missing)))
    db = config.open_db(settings.db)
    try:
        report = register_inputs(db, args.paths, languages)
    finally:
        db.close_all()
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(describe(report))
    if report.missing_inputs:
        print("error: some inputs do not exist", file=sys.stderr)
        return config.EXIT_USAGE
    return config.EXIT_FAILED if report.unreadable else config.EXIT_OK


if __name__ == "__main__":
    config.run_main(main)
