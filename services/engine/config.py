"""Engine configuration: one user-facing config, split into per-component configs.

Owns: ``EngineConfig`` (mirrors LMDeploy's PytorchEngineConfig: role, tp, dp, ep,
adapters, device_type, plus cache and scheduler knobs) and the frozen component
configs derived from it once, at the edge (``SchedulerConfig``).
``device_type`` names a platform of ``pdserve.engine.platforms``.
Validation raises ``ConfigError`` (a ValueError) with a message naming the field.
Building from YAML / environment lives here too so every entry point agrees.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from pdserve.common.roles import ROLES
from pdserve.engine.dtypes import MODEL_DTYPES
from pdserve.engine.platforms import platform_names

DEVICE_TYPES = platform_names()
DTYPES = MODEL_DTYPES
TP_BACKENDS = ("auto", "nccl", "gloo")
# the modules a LoRA adapter may train (PEFT's names for a Llama-family decoder layer's linears)
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"
    role: str = "hybrid"
    tp: int = 1
    dp: int = 1
    ep: int = 1
    # ep = dp x tp: this engine is replica ``dp_rank`` of ``dp`` that share the MoE layers; their
    # group meets on 127.0.0.1:``dp_port`` (the worker that starts the replicas picks it)
    dp_rank: int = 0
    dp_port: int = 0
    # ep across dp replicas: a MoE layer's tokens travel by all-to-all (each token only to the ranks
    # owning one of its experts) in steps where some replica has at least this many tokens, by a
    # padded all-gather below (no per-rank counts; faster at decode sizes). 0: always all-to-all
    expert_all_to_all_tokens: int = 256
    adapters: tuple[str, ...] = ()  # LoRA adapters loaded at start, each "name=path" (a PEFT directory)
    enable_lora: bool = False  # LoRA adapters can be loaded (at run time too); implied by ``adapters``
    max_loras: int = 4  # adapters on the device at once (slots); a step mixes at most this many
    max_cpu_loras: int | None = None  # adapters registered (host memory, swapped into slots by LRU); None: max_loras
    max_lora_rank: int = 64
    # the linear layers LoRA wraps (names of LORA_TARGET_MODULES, or "all"); empty: the modules the
    # ``adapters`` given at start target, all when none is given. A layer not wrapped keeps its fused
    # paths and takes no adapter memory; an adapter training it is refused when it is loaded
    lora_target_modules: tuple[str, ...] = ()
    # tp > 1: a rank that stops answering (alive but stuck) fails the worker after this many seconds of
    # a step: its peers' collectives time out, and the engine stops waiting for any rank's answer
    rank_timeout: float = 60.0
    # collectives between tp ranks: "auto" = NCCL on cuda (one GPU per rank), gloo on cpu; "gloo" on cuda
    # lets a worker's ranks share GPUs (rank i on visible GPU i mod count) and runs steps eagerly, since
    # gloo's collectives cannot be captured in a CUDA graph
    tp_backend: str = "auto"
    device_type: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_blocks: int | None = None
    cache_memory_fraction: float = 0.5
    max_batch_size: int = 64
    max_prefill_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # never capture step graphs (platforms with graphs capture decode steps)
    async_scheduling: bool | None = None  # launch step N+1 before reading step N's tokens; None: where the device runs asynchronously
    compiled_cpu_kernels: bool = True  # CPU: pdserve's C kernels where a C compiler can build them; False: pure torch
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.role in ROLES, "role", self.role, f"one of {ROLES}")
        _check(self.device_type in DEVICE_TYPES, "device_type", self.device_type, f"one of {DEVICE_TYPES}")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        for name in ("tp", "dp", "ep", "block_size", "max_batch_size", "max_prefill_tokens"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        if self.ep not in (1, self.tp, self.tp * self.dp):
            raise ConfigError(f"ep={self.ep} with tp={self.tp}, dp={self.dp}: ep must be 1, tp (a replica's ranks "
                              "share its MoE layers) or dp x tp (every rank of every replica shares them)")
        _check(isinstance(self.dp_rank, int) and 0 <= self.dp_rank < self.dp, "dp_rank", self.dp_rank,
               f"an integer in [0, dp={self.dp})")
        if self.ep_spans_replicas:
            self._check_replica_group()
        _check(self.tp_backend in TP_BACKENDS, "tp_backend", self.tp_backend, f"one of {TP_BACKENDS}")
        if self.tp_backend == "nccl" and self.device_type != "cuda":
            raise ConfigError(f"tp_backend='nccl' needs device_type='cuda', got {self.device_type!r}")
        for name in ("max_lora_rank", "max_loras"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, getattr(self, name),
                   "an integer >= 1")
        if self.max_cpu_loras is not None:
            _check(isinstance(self.max_cpu_loras, int) and self.max_cpu_loras >= self.max_loras, "max_cpu_loras",
                   self.max_cpu_loras, f"an integer >= max_loras={self.max_loras}")
        self._check_lora_targets()
        if len(self.adapter_paths()) > self.lora_capacity:
            raise ConfigError(f"adapters: {len(self.adapters)} given but max_cpu_loras={self.lora_capacity}")
        _check(isinstance(self.expert_all_to_all_tokens, int) and self.expert_all_to_all_tokens >= 0,
               "expert_all_to_all_tokens", self.expert_all_to_all_tokens, "an integer >= 0")
        _check(isinstance(self.rank_timeout, (int, float)) and self.rank_timeout > 0, "rank_timeout",
               self.rank_timeout, "a number of seconds > 0")
        _check(self.block_size & (self.block_size - 1) == 0, "block_size", self.block_size, "a power of two")
        if self.num_blocks is not None:
            _check(isinstance(self.num_blocks, int) and self.num_blocks >= 1, "num_blocks", self.num_blocks, "an integer >= 1")
        _check(0.0 < self.cache_memory_fraction <= 0.95, "cache_memory_fraction",
               self.cache_memory_fraction, "in (0, 0.95]")
        if self.max_model_len is not None:
            _check(isinstance(self.max_model_len, int) and self.max_model_len >= 1, "max_model_len",
                   self.max_model_len, "an integer >= 1")
        _check(bool(self.model), "model", self.model, "a model name or path")

    def _check_lora_targets(self) -> None:
        targets = self.lora_target_modules
        known = (*LORA_TARGET_MODULES, "all")
        for name in targets:
            _check(name in known, "lora_target_modules", targets, f"names among {known}")
        if "all" in targets and len(targets) > 1:
            raise ConfigError(f"lora_target_modules={targets!r} is invalid: 'all' stands alone")

    @property
    def ep_spans_replicas(self) -> bool:
        """The dp replicas share the MoE layers (ep = dp x tp): attention data-parallel, experts
        split over every rank, steps in lockstep."""
        return self.dp > 1 and self.ep == self.dp * self.tp

    def _check_replica_group(self) -> None:
        if self.device_type != "cpu":
            raise ConfigError(f"ep={self.ep} across dp={self.dp} replicas with device_type={self.device_type!r}: "
                              "runs on cpu in this version")
        _check(isinstance(self.dp_port, int) and 0 <= self.dp_port < 65536, "dp_port", self.dp_port,
               "a TCP port (0: the worker that starts the replicas picks one)")

    @property
    def collectives(self) -> str:
        """The torch.distributed backend between tp ranks: ``tp_backend`` with "auto" resolved."""
        if self.tp_backend != "auto":
            return self.tp_backend
        return "nccl" if self.device_type == "cuda" else "gloo"

    @property
    def lora_capacity(self) -> int:
        """How many adapters may be registered at once (``max_cpu_loras``, default ``max_loras``)."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.adapters)

    def adapter_paths(self) -> dict[str, str]:
        """``adapters`` as {name: path}; ConfigError on an entry that is not ``name=path`` or a repeated name."""
        paths: dict[str, str] = {}
        for entry in self.adapters:
            name, sep, path = str(entry).partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"adapters entry {entry!r} is invalid: expected name=path")
            if name.strip() in paths:
                raise ConfigError(f"adapters: the name {name.strip()!r} is given twice")
            paths[name.strip()] = path.strip()
        return paths

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "EngineConfig":
        """Build from a dict (YAML file, flags); unknown keys are an error."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown engine config keys {unknown}; known keys: {sorted(known)}")
        kwargs = {k: coerce_field(known[k], v) for k, v in values.items() if v is not None}
        return cls(**kwargs)

    @classmethod
    def env_overrides(cls, environ: Mapping[str, str], prefix: str = "PDSERVE_") -> dict[str, str]:
        """Engine keys given as PDSERVE_<KEY> environment variables."""
        names = {f.name for f in dataclasses.fields(cls)}
        out = {}
        for key, value in environ.items():
            if key.startswith(prefix) and key[len(prefix):].lower() in names:
                out[key[len(prefix):].lower()] = value
        return out


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int
    max_prefill_tokens: int
    max_model_len: int


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected {expected}")


def coerce_field(f: dataclasses.Field, value: Any) -> Any:
    """Turn a string from env/CLI into the field's type (bool, int, float, tuple; None-able
    ones take "none"/"auto"); other values are returned unchanged. The one such rule of
    every pdserve config built from flags, environment and YAML."""
    kind = str(f.type)
    if not isinstance(value, str):
        if f.name == "adapters" and isinstance(value, dict):
            return tuple(f"{k}={v}" for k, v in value.items())  # YAML: {name: path}
        if kind.startswith("tuple") and isinstance(value, (list, tuple)):
            return tuple(value)
        return value
    try:
        if kind.startswith("bool"):
            if "None" in kind and value.lower() in ("", "none", "auto"):
                return None
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind.startswith("int"):
            return None if value.lower() in ("", "none") else int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("tuple"):
            return tuple(x for x in value.split(",") if x)
    except ValueError:
        raise ConfigError(f"{f.name}={value!r} is invalid: expected {kind}") from None
    return value


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping from path; a clear error when it is missing or not a mapping."""
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping, got {type(data).__name__}")
    return data


__all__ = ["LORA_TARGET_MODULES", "EngineConfig", "SchedulerConfig", "ConfigError", "coerce_field", "load_yaml", "field"]
