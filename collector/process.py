"""What every command shares, apart from the argument parsing of :mod:`collector.cli`: exit
codes, the garbage-collector pause during start-up, and JSON output.

A module of its own so that command modules (:mod:`collector.commands`,
:mod:`collector.tenant_admin`) never import the CLI that imports them.
"""

from __future__ import annotations

import gc
import json

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2

# Start-up builds some 150k long-lived objects (modules, classes, pydantic validators, the config)
# and hardly any garbage. Letting the cyclic garbage collector walk them over and over while they
# are made, and again several times at interpreter exit, cost about a fifth of the CPU of a short
# `run --once`. So main() pauses the collector until the command has loaded its config, then
# freezes what exists (gc.freeze: later collections, the ones at exit included, skip it) and
# resumes collecting. Reference counting still frees frozen objects; only cycles among them stay.
_gc_paused_for_startup = False

RUN_GC_THRESHOLDS = (20_000, 50, 50)
"""The collector's thresholds once start-up is over (Python's defaults: 700, 10, 10).

Every request allocates a few hundred short-lived containers (aiohttp's request and response
objects, the decoded payload, the records), nearly all freed by reference counting. With the
defaults the young generation was collected some 420 times on a 200 x 30 ``run --once`` and the
older ones 40 times, about 0.35 s of CPU (6 %) for almost no garbage; with these thresholds 17 and
1 collections, 0.06 s, and no more memory (peak RSS 124-128 MiB either way)."""


def pause_gc_for_startup() -> None:
    """Stop cyclic garbage collection until :func:`end_startup` (only if it is running now)."""
    global _gc_paused_for_startup
    if gc.isenabled():
        gc.disable()
        _gc_paused_for_startup = True


def end_startup() -> None:
    """Freeze the objects start-up built and resume garbage collection, with thresholds for a
    long run of requests (:data:`RUN_GC_THRESHOLDS`); a no-op unless
    :func:`pause_gc_for_startup` stopped the collector (never undoes someone else's gc.disable)."""
    global _gc_paused_for_startup
    if _gc_paused_for_startup:
        _gc_paused_for_startup = False
        gc.freeze()
        gc.set_threshold(*RUN_GC_THRESHOLDS)
        gc.enable()


def dump_json(value: object) -> str:
    """``value`` as the indented, key-sorted JSON every ``--json`` output uses."""
    return json.dumps(value, indent=2, default=str, sort_keys=True)
