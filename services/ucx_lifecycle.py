"""A worker's UCX lifecycle: the options its endpoints start with, and the shutdown at exit."""

from __future__ import annotations

import logging

from moemesh.config.mesh import WorkerConfig
from moemesh.transport.ucx import UcxOptions, UcxRuntime

log = logging.getLogger(__name__)


def ucx_options(config: WorkerConfig) -> UcxOptions:
    """UCX progress in ucxx's own thread, requests completed by its notifier thread: nothing polls the event loop
    (the blocking / polling modes spin ~0.5 core per worker while a receive is pending, i.e. always)."""
    return UcxOptions(
        config.ucx_transports, config.ucx_net_devices, progress_mode="thread", notifier_thread=True
    )


def stop_ucx(reset: bool = True) -> None:
    """At exit, after every endpoint and listener closed: stops ucxx's notifier thread (the process would not
    exit while it runs) and, with `reset`, shuts UCX down. A role process skips the reset: ucxx's reset
    garbage-collects, which can block for many seconds on other objects' finalizers, and the process ends with
    os._exit right after (`moemesh.cli.entry`)."""
    if not reset:
        UcxRuntime.stop_notifier()
        return
    try:
        UcxRuntime.reset()
    except Exception as err:  # something still holds the context: the notifier thread stopped all the same
        log.info("UCX reset at exit: %s", str(err).splitlines()[0])
