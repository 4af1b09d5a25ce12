"""Small supervised workloads for testing and benchmarking the strategies (no RL, no downloads)."""

from jaxdp.workloads import digits

__all__ = ["digits"]
