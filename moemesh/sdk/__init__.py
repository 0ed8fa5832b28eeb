"""moemesh client SDK: needs only grpcio and protobuf (no torch).

from moemesh.sdk import Client
for chunk in Client("localhost:50051").generate(prompt="Hello", max_tokens=16):
    print(chunk.text, end="")
"""

from moemesh.sdk.aio_client import AsyncClient, AsyncStream
from moemesh.sdk.client import Client, Stream
from moemesh.sdk.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    MoemeshError,
    Overloaded,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from moemesh.sdk.messages import Chunk, Completion, ModelInfo, Sampling, TokenLogprob, TtftBreakdown, Usage
from moemesh.sdk.tls import TlsOptions

__all__ = [
    "Client",
    "Stream",
    "AsyncClient",
    "AsyncStream",
    "Chunk",
    "Completion",
    "ModelInfo",
    "Sampling",
    "TlsOptions",
    "TokenLogprob",
    "TtftBreakdown",
    "Usage",
    "MoemeshError",
    "InvalidRequest",
    "Overloaded",
    "DeadlineExceeded",
    "Unavailable",
    "Unauthenticated",
    "Cancelled",
    "ServerError",
]
