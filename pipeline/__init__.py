"""Code shared by verbatim's scripts and tools.

- ``errors``  : the provider error hierarchy and the retry policy (classified once, here).
- ``outputs`` : safe output paths and atomic, fsynced file writes.
- ``config``  : ``.env`` loading, settings, logging with secret redaction, common CLI options.
- ``media``   : scanning folders for audio/video, content hashing, registration.
- ``limiter`` : the per-provider rate/concurrency limiter shared by all worker threads.
- ``runner``  : the one job runner both parallel scripts use (claim, work, record, shut down).
"""
