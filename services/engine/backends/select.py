"""Choose the backend for a device type: the device's platform names it."""
from __future__ import annotations

from pdserve.engine.backends.base import Backend


def select_backend(device_type: str) -> Backend:
    from pdserve.engine.platforms import get_platform

    return get_platform(device_type).backend()
