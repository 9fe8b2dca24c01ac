"""A stand-in long job for the job-layer tests: ``python -m tests.training.job_fixture PROGRESS MODE [ARGS...]``.

It writes the project's progress format (``training.progress``). Modes: ``graceful`` (SIGTERM -> a 'stopped' event
and exit 130), ``stubborn`` (ignores SIGTERM and starts a grandchild that ignores it too), ``quick`` (a 'done' event,
exit 0). Every mode first writes a 'start' event with its pid, its arguments and (stubborn) the grandchild's pid.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from training.progress import ProgressLog


def main() -> None:
    path, mode, *rest = sys.argv[1:]
    log = ProgressLog(path)
    if mode == "quick":
        log.write("start", arguments=rest)
        log.write("done")
        return
    if mode == "graceful":

        def stop(_signum, _frame):
            log.write("stopped")
            sys.exit(130)

        signal.signal(signal.SIGTERM, stop)
        log.write("start", arguments=rest)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.pause()"
        grandchild = subprocess.Popen([sys.executable, "-c", code])
        log.write("start", arguments=rest, grandchild=grandchild.pid)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
