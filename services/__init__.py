"""moemesh services: gateway, prefill, decode and expert-pool workers."""
