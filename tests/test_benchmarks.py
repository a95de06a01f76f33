"""Every benchmark script runs with --quick and writes results that parse (timings are not checked)."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from helpers import subprocess_env

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))

pytestmark = pytest.mark.slow  # each one a fresh process that trains: many seconds


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_runs_quick(script, tmp_path):
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--backend", keras.backend.backend(), "--out", str(tmp_path)],
        env=subprocess_env(), capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert records, f"{script.name} wrote no JSON into --out"
    for record in records:
        assert record["environment"]["backend"] == keras.backend.backend()
        assert record["benchmark"]
    assert list(tmp_path.glob("*.md")), f"{script.name} wrote no markdown table"
