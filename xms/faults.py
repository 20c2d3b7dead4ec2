"""Named fault points for tests and the chaos harness: ``XMS_FAULTS=point[,point...]``.

At a named point the worker SIGKILLs itself, once per point (a marker file under
``XMS_FAULTS_DIR`` records that it fired), so a test can kill a worker at an exact step — e.g.
right after Cinder accepted a create — and see what the next worker does. Unset in production:
``point()`` is then a dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def point(name: str) -> None:
    wanted = os.environ.get("XMS_FAULTS", "")
    if not wanted or name not in wanted.split(","):
        return
    marker = Path(os.environ.get("XMS_FAULTS_DIR", "/tmp")) / f"xms-fault-{name}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return  # fired already
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
