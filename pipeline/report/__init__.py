"""The static HTML report of an archive (``tools/report.py``): data gathering in ``data``, the
progress chart in ``chart``, rendering and incremental writing in ``site``; Jinja2 templates in
``templates/`` and the few KB of CSS and JavaScript in ``assets/``."""

from pipeline.report.site import BuildResult, ReportOptions, build

__all__ = ["BuildResult", "ReportOptions", "build"]
