"""Decode role of disaggregation: ``coordinator.DecodeCoordinator`` reserves KV blocks,
asks a prefill worker to fill them (or prefills locally) and decodes (see README.md)."""
