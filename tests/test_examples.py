"""Smoke tests: every example runs offline and shows what it claims (EWC keeps task A)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(fine-tuning|EWC)\s+task A: ([\d.]+) -> ([\d.]+)\s+task B: ([\d.]+)$", re.M)


@pytest.mark.parametrize(
    "script, needs",
    [
        ("quickstart.py", None),
        ("lightning_two_tasks.py", "lightning"),
        ("hf_text_classification.py", "transformers"),
    ],
)
def test_example_ewc_keeps_task_a(script, needs):
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {m[0]: float(m[2]) for m in ROW.findall(proc.stdout)}
    assert set(after) == {"fine-tuning", "EWC"}, proc.stdout
    assert after["EWC"] > after["fine-tuning"] + 0.05, proc.stdout
