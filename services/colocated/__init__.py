"""The colocated worker: one process that prefills and decodes (the decode service, prefill always local)."""
