"""Generated wire stubs of pdserve (``pdserve.v1``); the sources are in ``proto/pdserve/``.

Regenerate with ``make proto``; ``tests/test_proto_stubs.py`` fails when they drift.
"""
