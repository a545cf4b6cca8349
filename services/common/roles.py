"""Worker roles and the one rule of who hands KV to whom.

Owns: ``ROLES`` and ``prefills_for`` / ``kv_pair``. Torch-free, so the router, the
cluster membership code, the engine's config and the workers all read the same
rule (routing, the router's ``/workers`` view, a worker's choice of KV peers).
"""
from __future__ import annotations

ROLES = ("hybrid", "prefill", "decode")
# (role that computes the prompt, role that receives its KV and decodes)
_HAND_OVERS = frozenset({("prefill", "decode"), ("hybrid", "decode"), ("prefill", "hybrid")})


def prefills_for(prefill_role: str, decode_role: str) -> bool:
    """Whether a ``prefill_role`` worker computes prompts for a ``decode_role`` worker.

    NOTE: two hybrids never pair (each prefills its own requests); same-role pools never pair.
    """
    return (prefill_role, decode_role) in _HAND_OVERS


def kv_pair(a: str, b: str) -> bool:
    """Whether workers of roles ``a`` and ``b`` exchange KV in either direction."""
    return prefills_for(a, b) or prefills_for(b, a)


__all__ = ["ROLES", "kv_pair", "prefills_for"]
