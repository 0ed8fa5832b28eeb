"""`moemesh bench serve | kernels`: the `bench` subcommand's parser (cli.py lists `add_parser` in SUBCOMMANDS).
Importing this module imports nothing heavy; each subcommand imports its work when it runs."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmarks: serve (a live endpoint), kernels (a GPU, a checkout)"
    )
    sub = p.add_subparsers(dest="bench_command", required=True)
    from moemesh.benchmark import kernels, serve

    serve.add_parser(sub)
    kernels.add_parser(sub)
