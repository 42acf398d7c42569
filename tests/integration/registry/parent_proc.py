"""Stands in for ``fmlora serve``: starts ``fmlora worker`` in a session of its own, as the server does,
passing ``--parent-pid``; prints ``WORKER <pid>`` and waits to be killed.

    python -m tests.integration.registry.parent_proc HOME [worker options...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main() -> None:
    home, options = sys.argv[1], sys.argv[2:]
    command = [sys.executable, "-m", "fmlora.cli", "worker", "--home", home, "--parent-pid", str(os.getpid()), *options]
    child = subprocess.Popen(command, start_new_session=True)
    print(f"WORKER {child.pid}", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
