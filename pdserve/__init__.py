"""pdserve: the one import namespace of the project.

Every module imports as ``pdserve.*``, so no package of ours can shadow a
third-party one (PyPI has packages named ``kernels``, ``services``, ``bench``)
whatever the current directory. The repository keeps its layout; the entries
below are links into it:

- ``pdserve.kernels`` -> ``kernels/`` (Triton and C kernels, torch references)
- ``pdserve.engine``, ``pdserve.common``, ``pdserve.cluster``, ``pdserve.worker``,
  ``pdserve.prefill``, ``pdserve.decode``, ``pdserve.router``, ``pdserve.launcher``
  -> ``services/<name>/``
- ``pdserve.v1``: generated wire stubs (sources in ``proto/pdserve/v1/``; ``make proto``)
- ``pdserve.bench``: benchmarks; ``pdserve.cli``: the ``pdserve`` command

NOTE: ``kernels/`` and ``services/`` have no ``__init__.py`` on purpose: with the
repository root on ``sys.path`` (``python -m ...``, pytest) a regular package there
would be imported instead of PyPI's package of the same name.
"""
