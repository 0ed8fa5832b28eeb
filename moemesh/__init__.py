"""moemesh: serve DeepSeek-V3-family MoE models as a mesh of services.

`import moemesh` is cheap and needs no torch: the server side (`LLM`, `SamplingParams`, `Completion`) loads on
first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "moemesh.llm",
    "SamplingParams": "moemesh.engine.sampling_params",
    "Completion": "moemesh.llm",
}

if TYPE_CHECKING:
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.llm import LLM, Completion

__all__ = ["LLM", "SamplingParams", "Completion", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moemesh' has no attribute {name!r}")
