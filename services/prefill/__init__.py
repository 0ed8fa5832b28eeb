"""The prefill worker: chunked prefill, KV pushed to decode workers over UCX (see worker.py)."""
