"""Model building blocks that know how they are split across ranks and how they multiply.

Owns: the layer classes models are assembled from (``linear``: replicated,
column-, merged-column-, qkv- and row-parallel linears with a pluggable
``LinearMethod``; ``embedding``: vocab-parallel embedding and LM head; ``norm``;
``rotary``), the rank context they are built with (``context``)
and the generic weight loading over them (``loading``), then the one pass that puts
loaded weights in the backend's form (``prepare``). Each layer loads its own
weights: given a whole checkpoint tensor it copies in the slice of its rank.

Lifecycle: built once (on the meta device, then materialised) from a
``LayerContext``; weights loaded once through ``loading`` and prepared once; then only ``forward``.
Layers hold no per-request state. They import ``backends`` (the fused ops; paged
attention stays a backend call) and nothing above the engine's model level.
"""
from pdserve.engine.layers.context import Communicator, LayerContext, SingleRank, divide
from pdserve.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pdserve.engine.layers.linear import (ColumnParallelLinear, LinearBase, LinearMethod,
                                          MergedColumnParallelLinear, QKVParallelLinear, QuantizedActivation,
                                          ReplicatedLinear, RowParallelLinear, UnquantizedLinearMethod)
from pdserve.engine.layers.loading import WeightSpec, init_dummy_weights, load_into
from pdserve.engine.layers.norm import RMSNorm
from pdserve.engine.layers.prepare import prepare_weights
from pdserve.engine.layers.rotary import RotaryEmbedding

__all__ = ["ColumnParallelLinear", "Communicator", "LayerContext", "LinearBase", "LinearMethod",
           "MergedColumnParallelLinear", "ParallelLMHead", "QKVParallelLinear", "QuantizedActivation", "RMSNorm", "ReplicatedLinear",
           "RotaryEmbedding", "RowParallelLinear", "SingleRank", "UnquantizedLinearMethod",
           "VocabParallelEmbedding", "WeightSpec", "divide", "init_dummy_weights", "load_into", "prepare_weights"]
