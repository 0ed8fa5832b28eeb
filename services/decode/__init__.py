"""The decode worker: KV leases filled by prefill workers over UCX, continuous-batch decode (see worker.py)."""
