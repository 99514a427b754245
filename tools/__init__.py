"""The command-line tools (run as ``python tools/NAME.py``); some share code (``tools.status``)."""
