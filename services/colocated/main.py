"""`moemesh serve colocated`: the decode service with every prompt prefilled locally (no KV transfer)."""

from __future__ import annotations

import argparse
import asyncio

from moemesh.config.mesh import WorkerConfig
from moemesh.config.telemetry import TelemetryConfig
from moemesh.services.decode.main import serve


def main(args: argparse.Namespace) -> int:
    config = WorkerConfig.from_args(args)  # role "colocated": force_local_prefill
    return asyncio.run(serve(config, TelemetryConfig.from_args(args)))
