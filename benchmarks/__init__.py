"""Benchmarks: plain scripts, see benchmarks/common.py.

The fake providers live here (``fakeserver``, ``fake_translate``, ``mediagen``, ``fakeapi``):
benchmarks run them, and the tests import them from here. Nothing of verbatim itself (the
top-level modules, ``pipeline``, ``tools``) imports ``benchmarks`` or ``tests``.
"""
