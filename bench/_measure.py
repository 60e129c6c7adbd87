"""Run a command and write its wall time, CPU time and peak RSS as JSON: ``_measure.py OUT -- CMD``.

A child's ``ru_maxrss`` starts at the resident size of whoever spawned it (Linux records the old
address space's high-water mark at ``exec``, and ``subprocess`` spawns with vfork), so a big
benchmark process would inflate every runner's figure. This launcher stays a bare interpreter
(stdlib only, a few MiB), so the peak it reports is the runner's own.
"""

import json
import os
import subprocess
import sys
import time


def main() -> int:
    out, sep, *cmd = sys.argv[1:]
    if sep != "--" or not cmd:
        print("usage: _measure.py OUT.json -- CMD [ARGS...]", file=sys.stderr)
        return 2
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    result = {
        "exit_code": code,
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "max_rss_kib": usage.ru_maxrss,
    }
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
