"""Prefill role of disaggregation: ``server.PrefillServer`` computes prompts for decode
workers and writes their KV into the decode workers' blocks over NIXL (see README.md)."""
