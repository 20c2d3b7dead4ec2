"""Record workflow histories for the replay test (tests/test_replay.py).

    .venv/bin/python scripts/record_histories.py     # writes tests/histories/*.json

Runs real migrations on a throw-away embedded stack: cold; warm with two syncs and a cutover;
warm cancelled while Ready; cold refused at admission. Re-record only on purpose: a workflow
change that cannot replay these must go behind ``workflow.patched()`` instead.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import start_stack, wait_until  # noqa: E402
from xms import client as xc  # noqa: E402
from xms.demo import make_disk  # noqa: E402
from xms.models import MiB  # noqa: E402

OUT = ROOT / "tests" / "histories"


def status(st, name: str) -> dict:
    return json.loads(st.cli("status", name, "--json").stdout)


async def dump(st, names: list[str]) -> None:
    c = await xc.connect(st.settings)
    OUT.mkdir(exist_ok=True)
    for name in names:
        hist = await c.get_workflow_handle(name).fetch_history()
        (OUT / f"{name}.json").write_text(hist.to_json())
        print(f"recorded {name}: {len(hist.events)} events")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        st = start_stack(t / "stack")
        try:
            cold = make_disk(t / "cold.raw", 32 * MiB, [(MiB, 4 * MiB)], seed=1)
            assert st.cli("migrate", "replay-cold", "--disk", str(cold), "--project", "r", "--volume-type",
                          "standard-ssd", "--wait").returncode == 0
            assert st.cli("migrate", "replay-refused", "--disk", str(cold), "--project", "r", "--volume-type",
                          "gold").returncode != 0
            warm = make_disk(t / "warm.qcow2", 32 * MiB, [(MiB, 4 * MiB)], fmt="qcow2", seed=2)
            assert st.cli("migrate", "replay-warm", "--disk", str(warm), "--project", "r", "--volume-type",
                          "standard-ssd", "--mode", "warm", "--sync-interval", "1h").returncode == 0
            wait_until(lambda: status(st, "replay-warm")["phase"] == "Ready", 60, "Ready")
            for i in (1, 2):
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {i} {i}M 64k", str(warm)], check=True,
                               capture_output=True)
                assert st.cli("sync-now", "replay-warm").returncode == 0
                wait_until(lambda i=i: status(st, "replay-warm")["syncs_done"] == i, 60, f"sync {i}")
            assert st.cli("cutover", "replay-warm").returncode == 0
            other = make_disk(t / "other.qcow2", 32 * MiB, [(MiB, 4 * MiB)], fmt="qcow2", seed=3)
            assert st.cli("migrate", "replay-cancel", "--disk", str(other), "--project", "r", "--volume-type",
                          "standard-ssd", "--mode", "warm", "--sync-interval", "1h").returncode == 0
            wait_until(lambda: status(st, "replay-cancel")["phase"] == "Ready", 60, "Ready")
            assert st.cli("cancel", "replay-cancel").returncode == 0
            wait_until(lambda: status(st, "replay-cancel")["phase"] == "Cancelled", 60, "Cancelled")
            asyncio.run(dump(st, ["replay-cold", "replay-refused", "replay-warm", "replay-cancel"]))
        finally:
            st.stop_worker()
            st.server.stop()


if __name__ == "__main__":
    main()
