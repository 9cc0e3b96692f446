"""Several server processes on one port, so a multi-core machine is not held to one core by the GIL.

Each process is a whole :func:`server.app.serve`: its own engine, micro-batcher and
gRPC server, all bound to the same port with ``SO_REUSEPORT``, so the kernel spreads
incoming connections over them. They are forked before any of them creates a gRPC
server or runs torch (gRPC and OpenMP thread pools do not survive a fork), and load
their bundle after the fork.

The kernel places connections, not requests, so the processes are linked
(:mod:`server.peers`): one whose engine is busier hands Recommend queries to a less busy
one, and a client with a single connection still has every engine working for it.
Apart from those links and the load figures they publish, the processes share nothing
in memory, so users' logged behaviour must live where all of them read it: the SQLite
event store they share (``state="memory"`` with an ``event_log``; each process reads
what the others committed before each lookup) or Redis (``state="redis://..."``); the
parent refuses memory state without an event log. Each
process follows ``CURRENT`` on its own; the ``Reload`` rpc reaches the one process
that took the call, and the others switch at their next poll.

Each process is pinned to cores of its own: the cores this process may run on, split
into one contiguous group per process (one core each on a machine with a core per
process; round robin when there are more processes than cores). A process computes on
about one core anyway (its Python work holds the GIL); pinned, its threads stop
migrating between cores and keep their core's caches, and two processes do not crowd
onto one core while another idles. On a 2-core machine at 400 QPS this lowered both p50
and p99 in each of four paired runs, at the same CPU a request (figures in the README).
"""

import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
from typing import Any

from funnel.events.eventlog import EventStoreError
from funnel.server.app import BindError, ServerOptions, serve
from funnel.server.peers import Peers, close_all, keep_own, link_processes
from funnel.server.state import StateUnavailable

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0


class ProcessesError(ValueError):
    """Settings that several processes cannot run with."""


def serve_processes(processes: int, serve_kwargs: dict[str, Any], *, pin_cores: bool = True, share_work: bool = True) -> int:
    """Run ``processes`` copies of :func:`server.app.serve` on one port until SIGINT or SIGTERM.

    A signal to this (parent) process is passed on to every server, which drains its
    in-flight requests and stops. If one server dies on its own, the others are stopped
    too, so a supervisor sees the failure and restarts the whole set.

    Args:
        processes: server processes (at least 2; for 1, call ``serve`` directly).
        serve_kwargs: keyword arguments of :func:`server.app.serve`. ``port`` must be
            fixed (not 0); ``state`` ``memory`` with an ``event_log`` file, or a ``redis://`` URL. Process
            ``i`` (from 0) serves metrics on ``metrics_port + i``. ``threads`` defaults
            to the cores divided between the processes (half for math, as in one process).
        pin_cores: pin each process to cores of its own (:func:`core_groups`); False leaves
            placement to the scheduler, e.g. on a machine whose cores other busy services share.
        share_work: link the processes so that a busy one hands Recommend queries to a
            less busy one (:mod:`server.peers`); False keeps each query where its connection landed.

    Returns:
        0 after a requested stop; 1 if a server process failed.

    Raises:
        ProcessesError: for settings that several processes cannot share.
    """
    _check(processes, serve_kwargs)
    cores = sorted(os.sched_getaffinity(0))
    threads = serve_kwargs.get("threads") or max(1, len(cores) // (2 * processes))
    pins = core_groups(cores, processes) if pin_cores else [None] * processes
    context = multiprocessing.get_context("fork")
    options = dataclasses.replace(serve_kwargs.get("options") or ServerOptions(), reuse_port=True)
    # Without batching no process would take a peer's query.
    links = link_processes(processes) if share_work and options.max_batch > 1 else None
    children = []
    for i in range(processes):
        kwargs = dict(serve_kwargs, threads=threads, options=options)
        if kwargs.get("metrics_port"):  # 0 (any free port) stays 0
            kwargs["metrics_port"] += i
        children.append(context.Process(target=_child, args=(i, processes, kwargs, os.getpid(), pins[i], links), name=f"funnel-serve-{i}"))
    stopping = False

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.pid is not None and child.exitcode is None:
                os.kill(child.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for child in children:
            if stopping:  # a signal during start-up: start no more
                break
            child.start()
        if links is not None:
            close_all(links)  # the children hold their ends; a child that dies then closes its links
        children = [c for c in children if c.pid is not None]
        log.info(
            "started %d server processes (pids %s), %d compute threads each, %s", len(children), ", ".join(str(c.pid) for c in children), threads,
            f"pinned to cores {' | '.join(','.join(map(str, sorted(p))) for p in pins[: len(children)])}" if pin_cores else "not pinned to cores",
        )
        multiprocessing.connection.wait([c.sentinel for c in children])
        requested = stopping
        if not requested:
            for child in children:
                if child.exitcode is not None:
                    log.error("server process %s (pid %d) exited with code %s; stopping the others", child.name, child.pid, child.exitcode)
            stop()
        for child in children:
            child.join(STOP_TIMEOUT_S)
            if child.exitcode is None:
                log.error("server process %s (pid %d) did not stop within %.0f s; killing it", child.name, child.pid, STOP_TIMEOUT_S)
                child.kill()
                child.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # A process still loading its bundle when the stop came ends by the signal itself.
    return 0 if requested and all(c.exitcode in (0, -signal.SIGTERM) for c in children) else 1


def core_groups(cores: list[int], processes: int) -> list[set[int]]:
    """The cores each of ``processes`` processes is pinned to.

    Args:
        cores: the cores the server may use, ascending.
        processes: how many processes share them.

    Returns:
        One set per process: contiguous groups of near-equal size, or a single core each,
        round robin, when there are more processes than cores.
    """
    if processes >= len(cores):
        return [{cores[i % len(cores)]} for i in range(processes)]
    bounds = [round(i * len(cores) / processes) for i in range(processes + 1)]
    return [set(cores[a:b]) for a, b in zip(bounds, bounds[1:])]


def _check(processes: int, kwargs: dict[str, Any]) -> None:
    if processes < 2:
        raise ProcessesError(f"serve_processes runs 2 or more processes, got {processes}")
    if not kwargs.get("port"):
        raise ProcessesError("several server processes share one port: give a fixed --port, not 0")
    if kwargs.get("state", "memory") == "memory" and not kwargs.get("event_log"):
        raise ProcessesError(
            "several server processes share logged events through the event log (--event-log PATH) or Redis (--state redis://HOST:PORT), "
            "so that an event logged through one process is seen by the next Recommend on any other; without either they would not"
        )


def _child(i: int, n: int, kwargs: dict[str, Any], parent: int, cores: set[int] | None, links: list[Peers] | None = None) -> None:
    # The parent's handlers were inherited; serve() installs its own once it is up.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _stop_with_parent(parent)
    if cores is not None:
        # Before serve() starts any thread: threads inherit the mask of the thread that creates them.
        try:
            os.sched_setaffinity(0, cores)
        except OSError as err:  # a core taken away since the parent looked: serve unpinned rather than not at all
            log.warning("server process %d of %d: could not pin to cores %s (%s); the scheduler places it", i + 1, n, sorted(cores), err)
    log.info("server process %d of %d (pid %d)", i + 1, n, os.getpid())
    if links is not None:
        kwargs = dict(kwargs, peers=keep_own(links, i))
    try:
        serve(**kwargs)
    except (StateUnavailable, EventStoreError, BindError) as err:
        log.error("server process %d of %d: %s", i + 1, n, err)
        raise SystemExit(2) from None


PR_SET_PDEATHSIG = 1


def _stop_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its parent (pid ``parent``) dies (Linux), so a
    parent killed with SIGKILL leaves no orphan servers holding the port; elsewhere nothing is done."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
