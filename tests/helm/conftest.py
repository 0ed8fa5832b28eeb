"""The GPU machines have neither Helm (helm-python-sdk) nor hadolint, and no network to install them: there,
only the GPU test of this folder is collected. Everywhere else a missing tool fails loudly at import."""

import importlib.util

import torch

if torch.cuda.is_available() and importlib.util.find_spec("helm_python") is None:
    collect_ignore = ["test_chart.py", "test_commands.py", "test_images.py"]
