"""LoRA adapters: loading PEFT checkpoints and applying many adapters in one batch.

``peft_format`` reads an adapter directory (``adapter_config.json`` and the
``lora_A``/``lora_B`` tensors) into a ``PeftAdapter``; ``slots`` (``AdapterSlots``,
owned by a rank) stacks every loaded adapter's weights beside the linear layers they
target, each sliced for the rank like its base layer, and wraps those layers'
``LinearMethod`` so that every row of a step gets the delta of its own adapter
(none for base-model rows). ``residency`` (``AdapterResidency``, the scheduler's)
decides which registered adapters occupy the ``max_loras`` device slots, least
recently used out first; each step's plan tells the ranks what to copy in.
"""
from pdserve.engine.lora.peft_format import PeftAdapter, load_peft_adapter
from pdserve.engine.lora.slots import AdapterSlots, LoRALinearMethod

__all__ = ["AdapterSlots", "LoRALinearMethod", "PeftAdapter", "load_peft_adapter"]
