"""Quantized checkpoints: which schemes pdserve runs and the linear methods that run them.

Owns: ``scheme`` (reading a checkpoint's ``quantization_config`` into a checked
``W8A8Scheme``: torch-free), ``w8a8`` (the int8 linear method) and ``linear_methods``
(the per-layer choice a model's ``LayerContext`` carries). Layering: this package
imports ``pdserve.engine.layers``; layers never import it (they ask the context).
"""
