"""The expert-pool worker: routed experts as their own service."""
