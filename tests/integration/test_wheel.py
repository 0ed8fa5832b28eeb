"""The built wheel serves: it is built from the tracked sources, installed (not editable) into a fresh venv, and
`moemesh up` from that venv brings a mesh up on the demo model that answers through the SDK with the same
greedy tokens as the in-process engine. Also: the wheel holds every package and data file of the source tree,
and its base install requires no torch."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from moemesh.supervisor import free_ports

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "To Sherlock Holmes she is always"
MAX_TOKENS = 8
# source folder -> where its files land in the wheel (setup.py's mapping)
ROOTS = {"moemesh/": "moemesh/", "kernels/": "moemesh/kernels/", "services/": "moemesh/services/"}
DEMO_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if (ROOT / line).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Builds the wheel from a copy of the tracked tree (a build/ left in the checkout cannot leak into it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in _tracked_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp / "dist").glob("moemesh-*.whl")
    return wheel


def test_the_wheel_holds_every_package_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for name in _tracked_files():
        for folder, installed in ROOTS.items():
            if name.startswith(folder):
                expected.add(installed + name[len(folder) :])
    expected |= {f"moemesh/demo/{f}" for f in DEMO_FILES}
    assert "moemesh/services/decode/main.py" in expected and "moemesh/kernels/mla_decode.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
    assert not [n for n in names if n.startswith("moemesh/demo/") and ("corpus" in n or "bf16" in n)]
    assert sum(zipfile.ZipFile(wheel).getinfo(n).file_size for n in names) < 20 * 2**20


def test_the_base_install_requires_no_torch(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    requires = meta.get_all("Requires-Dist") or []
    base = [r for r in requires if "extra ==" not in r]
    server = [r for r in requires if re.search(r"extra == ['\"]server['\"]", r)]
    assert sorted(re.split(r"[<>=!~ ;]", r)[0] for r in base) == ["grpcio", "protobuf"]
    assert any(r.startswith("torch") for r in server) and any(r.startswith("ucxx") for r in server)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no deps); torch, grpc, ucxx... come from this interpreter's
    site-packages through a .pth appended after the venv's own, so moemesh itself can only come from the wheel."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (site,) = (venv / "lib").glob("python3*/site-packages")
    deps = [p for p in sys.path if p.endswith("site-packages") and not (Path(p) / "moemesh").is_dir()]
    (site / "zz_moemesh_test_deps.pth").write_text("\n".join(deps) + "\n")
    return venv


def test_moemesh_imports_from_the_wheel_and_the_sdk_without_torch(venv):
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'triton', 'numpy'): raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import moemesh, moemesh.sdk\n"
        "from moemesh.config.mesh import resolve_model_dir\n"
        "print(moemesh.__file__); print(resolve_model_dir('demo'))\n"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60, cwd=venv
    )
    assert done.returncode == 0, done.stderr
    module, demo = done.stdout.split()
    assert module.startswith(str(venv)) and demo.startswith(str(venv)), done.stdout
    assert demo.endswith("site-packages/moemesh/demo")


@pytest.mark.slow
def test_moemesh_up_from_the_wheel_serves_the_demo_through_the_sdk(venv):
    from moemesh import LLM, SamplingParams
    from moemesh.sdk import Client

    port, http_port = free_ports(2)
    env = {**os.environ, "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", "UCXPY_PROGRESS_MODE": "blocking"}
    env.pop("PYTHONPATH", None)
    argv = [
        str(venv / "bin" / "moemesh"),
        "up",
        "--model",
        "demo",
        "--topology",
        "colocated",
        "--port",
        str(port),
        "--http-port",
        str(http_port),
        "--torch-threads",
        "1",
        "--startup-timeout",
        "240",
    ]
    process = subprocess.Popen(
        argv,
        cwd=venv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        # the oracle: the in-process engine's greedy tokens (computed while the mesh starts)
        expected = LLM("demo", device="cpu").generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS))[0]
        deadline = time.monotonic() + 240
        while not any(line.startswith("ready on ") for line in lines):
            assert process.poll() is None, "moemesh up exited:\n" + "".join(lines[-30:])
            assert time.monotonic() < deadline, "not ready after 240 s:\n" + "".join(lines[-30:])
            time.sleep(0.2)
        with Client(f"127.0.0.1:{port}", timeout_s=120) as client:
            chunks = list(client.generate(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0))
        assert [t for c in chunks for t in c.token_ids] == expected.token_ids
        assert "".join(c.text for c in chunks) == expected.text
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, "".join(lines[-30:])
