"""Smoke tests: every example runs and says what it claims."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_ewc_keeps_task_a():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    after = {m: float(a) for m, a in re.findall(r"^(\S+)\s+task A: [\d.]+ -> ([\d.]+)", out, re.M)}
    assert after["EWC"] > after["fine-tuning"] + 0.05, out
