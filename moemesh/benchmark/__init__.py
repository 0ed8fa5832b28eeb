"""Serving and kernel benchmarks behind `moemesh bench`: a load generator for live endpoints (serve) and the
kernel benchmarks' summary (kernels). Client side only: imports the SDK, never torch."""
