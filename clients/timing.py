"""Device-side timestamps for the server's split of an exchange's time (run config ``timing``)."""

from __future__ import annotations

import os
import time

from flwr.app import ConfigRecord, Context, Message

_APP_LOADED_AT = time.time()


def _process_started_at() -> float:
    """Wall-clock start of this process (Linux ``/proc``; else when this module was loaded)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _APP_LOADED_AT


def timing_mod(msg: Message, context: Context, call_next) -> Message:
    """With run config ``timing = true``, add the device's wall-clock timestamps to the reply:
    process start, handler start and end. The server subtracts them from its own push and
    receive times to split an exchange into pickup (polls), process startup, handler and return
    (meaningful where server and devices share a clock, as on one machine)."""
    if not context.run_config.get("timing", False):
        return call_next(msg, context)
    start = time.time()
    reply = call_next(msg, context)
    if not reply.has_error():
        reply.content["timing"] = ConfigRecord(
            {
                "process-start": _process_started_at(),
                "handler-start": start,
                "handler-end": time.time(),
            }
        )
    return reply
