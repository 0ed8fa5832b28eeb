"""Enforces the import direction of DESIGN §2: which moemesh subpackage may import which.

Run from the repository root; exits 1 and lists every violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# subpackage -> the moemesh subpackages it may import (itself is always allowed)
ALLOWED: dict[str, set[str]] = {
    "services": {"engine", "transport", "model", "kernels", "telemetry", "config", "_proto"},
    "engine": {"model", "kernels", "telemetry", "config"},
    "transport": {"telemetry", "config", "_proto"},
    "model": {"kernels", "config"},
    "kernels": set(),
    "config": set(),
    "telemetry": set(),
    "sdk": {"_proto"},
    "benchmark": {"sdk"},  # the client side of `moemesh bench`
    "_proto": set(),
}
# Third-party modules a subpackage must never import.
FORBIDDEN_EXTERNAL: dict[str, set[str]] = {
    "engine": {"grpc", "ucxx"},
    "sdk": {"torch", "triton", "numpy"},
    "benchmark": {"torch", "triton", "numpy"},
    "kernels": {"grpc", "ucxx"},
    "model": {"grpc", "ucxx"},
    "config": {"torch"},
}
ROOTS = {"moemesh": Path("moemesh"), "kernels": Path("kernels"), "services": Path("services")}


def owner(path: Path) -> str | None:
    parts = path.parts
    if parts[0] in ("kernels", "services"):
        return parts[0]
    if parts[0] == "moemesh" and len(parts) > 2:
        return parts[1]
    return None  # moemesh/__init__.py, moemesh/cli.py: composition roots, may import anything


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
    return names


def check(path: Path) -> list[str]:
    pkg = owner(path)
    if pkg is None:
        return []
    errors = []
    for lineno, name in imported(ast.parse(path.read_text(), str(path))):
        parts = name.split(".")
        if parts[0] == "moemesh" and len(parts) > 1:
            target = parts[1]
            if target != pkg and target not in ALLOWED.get(pkg, set()):
                errors.append(f"{path}:{lineno}: {pkg} must not import moemesh.{target}")
        elif parts[0] in FORBIDDEN_EXTERNAL.get(pkg, set()):
            errors.append(f"{path}:{lineno}: {pkg} must not import {parts[0]}")
    return errors


def main() -> int:
    errors = []
    for root in ROOTS.values():
        for path in sorted(root.rglob("*.py")):
            if "_proto" in path.parts:
                continue
            errors += check(path)
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
