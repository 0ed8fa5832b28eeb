"""Observability knobs every role shares (DESIGN §7): where spans go, how many recent traces stay in memory for
the built-in trace view, and the log format. The only reader of their flags and environment.

    knob                                  flag (serve and up)        environment
    OTLP/gRPC collector ("" = no export)  --otlp-endpoint            OTEL_EXPORTER_OTLP_ENDPOINT
    recent traces kept in memory          --trace-buffer             MOEMESH_TRACE_BUFFER
    log lines                             --log-format text|json     MOEMESH_LOG_FORMAT
    level of a process's log lines        --log-level                MOEMESH_LOG_LEVEL
    level of per-request log lines        --request-log-level        MOEMESH_REQUEST_LOG_LEVEL

Tracing is off (a no-op tracer, nothing recorded) when there is no endpoint and `trace_buffer` is 0.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class TelemetryConfig:
    """* otlp_endpoint: an OTLP/gRPC collector, "host:port" or "http://host:port"; "" = no export.
    * trace_buffer: traces whose spans this process keeps in memory (the gateway: requests in /traces).
    * log_level: this process's log lines; request_log_level: lines about one request (`moemesh up` shows
      them only at WARNING and above unless asked, so its console is not one line per request)."""

    otlp_endpoint: str = ""
    trace_buffer: int = 256
    log_format: str = "text"
    log_level: str = "INFO"
    request_log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.trace_buffer < 0:
            raise ValueError(f"trace_buffer={self.trace_buffer} must be >= 0 (0 = keep none)")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format={self.log_format!r} must be one of {', '.join(LOG_FORMATS)}")
        for name in ("log_level", "request_log_level"):
            if getattr(self, name).upper() not in LOG_LEVELS:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {', '.join(LOG_LEVELS)}")

    @property
    def tracing(self) -> bool:
        return bool(self.otlp_endpoint) or self.trace_buffer > 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TelemetryConfig:
        """From the flags `add_arguments` added (their defaults came from the environment)."""
        return cls(
            otlp_endpoint=args.otlp_endpoint, trace_buffer=args.trace_buffer, log_format=args.log_format,
            log_level=args.log_level, request_log_level=args.request_log_level,
        )  # fmt: skip

    def child_args(self) -> tuple[str, ...]:
        """The flags that give a `moemesh serve` child this configuration (what `moemesh up` passes on)."""
        args = ("--trace-buffer", str(self.trace_buffer), "--log-format", self.log_format,
                "--log-level", self.log_level, "--request-log-level", self.request_log_level)  # fmt: skip
        return (*args, "--otlp-endpoint", self.otlp_endpoint) if self.otlp_endpoint else args


def add_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None, *, request_log_level: str = "INFO"
) -> None:
    """The flags of the table above, each defaulting to its environment variable, then to the built-in
    default. request_log_level: this command's built-in default for it (`up`: WARNING)."""
    env = os.environ if env is None else env
    parser.add_argument("--otlp-endpoint", default=env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
                        metavar="HOST:PORT", help="export spans over OTLP/gRPC to this collector; '' = no "
                        "export (env OTEL_EXPORTER_OTLP_ENDPOINT)")  # fmt: skip
    parser.add_argument("--trace-buffer", type=int, default=env.get("MOEMESH_TRACE_BUFFER", "256"),
                        metavar="N", help="recent traces kept in memory for /traces; 0 with no --otlp-endpoint "
                        "turns tracing off (env MOEMESH_TRACE_BUFFER)")  # fmt: skip
    parser.add_argument("--log-format", default=env.get("MOEMESH_LOG_FORMAT", "text"), choices=LOG_FORMATS,
                        help="text, or one JSON object per line with request_id and trace_id "
                        "(env MOEMESH_LOG_FORMAT)")  # fmt: skip
    parser.add_argument("--log-level", default=env.get("MOEMESH_LOG_LEVEL", "INFO").upper(), type=str.upper,
                        choices=LOG_LEVELS, help="log level (env MOEMESH_LOG_LEVEL)")  # fmt: skip
    parser.add_argument("--request-log-level", type=str.upper, choices=LOG_LEVELS,
                        default=env.get("MOEMESH_REQUEST_LOG_LEVEL", request_log_level).upper(),
                        help="lowest level of the log lines about one request (env MOEMESH_REQUEST_LOG_LEVEL)")  # fmt: skip
