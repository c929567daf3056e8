"""Traffic simulation: the synthetic app-store world, its logs, and load generators."""
