"""Torch-free pieces shared by the engine and the router: sampling parameters,
tokenizer loading, chat templates and incremental detokenization.

Layering: ``services/common`` imports neither torch nor the engine, so the router
can use it. The engine imports it.
"""
