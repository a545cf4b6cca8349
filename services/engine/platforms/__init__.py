"""Platforms: what the engine needs from a family of devices, behind one small interface.

Owns: the registry from ``EngineConfig.device_type`` to a ``Platform`` class, named by
module path so that this package imports no torch (the config validates device types
against ``platform_names()`` without loading torch). Adding a device family (ascend,
maca, camb, ...) means one module with a ``Platform`` implementation and one entry here;
the engine does not change.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.engine.platforms.base import Platform

# device_type -> "module:Class"; imported only when that platform is asked for.
_REGISTRY: dict[str, str] = {
    "cpu": "pdserve.engine.platforms.cpu:CpuPlatform",
    "cuda": "pdserve.engine.platforms.cuda:CudaPlatform",
}


def platform_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_platform(device_type: str) -> "Platform":
    """The platform of a device type; ValueError naming the known ones otherwise."""
    target = _REGISTRY.get(device_type)
    if target is None:
        raise ValueError(f"device_type={device_type!r} has no platform; supported: {', '.join(_REGISTRY)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["get_platform", "platform_names"]
