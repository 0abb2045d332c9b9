"""The README's first command: scripts/demo starts its own PostgreSQL and NATS, relays sample
orders (one of them rolled back) and stops everything it started."""

import subprocess
from pathlib import Path

import pytest

from harness import build_dir, clean_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_demo_runs_end_to_end_and_cleans_up(root):
    demo_dir = root.mkdir("demo") / "run"  # under the harness's temp root, reachable by postgres
    # The runner's own OUTBOXD_* variables (OUTBOXD_TEST_STAGES, ...) are not outboxd settings.
    env = clean_env({"OUTBOXD_DEMO_DIR": str(demo_dir), "OUTBOXD_BUILD_DIR": str(build_dir())})
    r = subprocess.run([str(REPO / "scripts" / "demo"), "--once"], capture_output=True, text=True,
                       env=env, timeout=220, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert out.count("outbox.order.created id=") == 2, out
    assert '"customer": "ada"' in out and '"customer": "grace"' in out
    assert "linus" not in out.split("events in the stream OUTBOX:")[1], "the rolled-back order was published"
    # Everything it started is gone: no server still runs on its data folder.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(demo_dir) not in ps, "a demo process is still running"
