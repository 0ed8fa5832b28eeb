"""The gateway: the public Gateway service and the Registry; routes requests to decode / prefill workers."""
