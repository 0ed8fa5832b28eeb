"""The base install is the client SDK: `import moemesh` and `import moemesh.sdk` must work without torch."""

from __future__ import annotations

import subprocess
import sys

BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'triton', 'numpy'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, _Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=60
    )


def test_import_moemesh_and_sdk_without_torch():
    done = _run("import moemesh, moemesh.sdk; from moemesh.sdk import Client; print(moemesh.__version__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0.1.0"


def test_llm_loads_server_side_lazily():
    done = _run("import moemesh\ntry:\n    moemesh.LLM\nexcept ImportError as e:\n    print('lazy:', e)")
    assert done.returncode == 0, done.stderr
    assert "lazy: torch is blocked" in done.stdout


def test_public_api_names():
    from moemesh import LLM, Completion, SamplingParams

    assert LLM.__name__ == "LLM" and Completion.__name__ == "Completion"
    assert SamplingParams().max_tokens == 16
