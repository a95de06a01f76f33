"""A preempted run resumed in a new process ends bit-identical to an uninterrupted one.

For each kind of data (arrays without shuffling, seeded shuffled arrays, a
shuffled HDF5Sequence), tests/workers/resume_exact.py trains a data-parallel
twin over 2 devices with the four callbacks of this package: once without
interruption; then once stopped by SIGTERM at 10 random batches in a row
(each stop resumed in the same process from its preemption checkpoint:
the end of that chain must equal the uninterrupted run); separately, killed
by SIGKILL right after a batch-frequency checkpoint was committed. Then a new
process resumes every one of those checkpoints and trains to the end.
Weights and optimizer variables must equal the uninterrupted run's exactly.
"""

import json
import random
import subprocess
import sys

import pytest
from helpers import WORKERS_DIR, subprocess_env

SCRIPT = str(WORKERS_DIR / "resume_exact.py")
KINDS = ("arrays", "shuffled", "hdf5")
SIGTERMS = 10


def _start(args, env):
    return subprocess.Popen([sys.executable, SCRIPT, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=600):
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out, err


@pytest.mark.slow
def test_interrupted_runs_resume_bit_identically(tmp_path):
    env = subprocess_env()  # with the run's JAX compilation cache (conftest.py)
    # The SIGKILL runs go beside the SIGTERM runs, on the other core: 3 epochs of 6 batches,
    # a checkpoint every 3, so the n-th save is at batch 3n.
    kills = {kind: random.Random(kind).randrange(1, 6) for kind in KINDS}
    interrupt = _start(["interrupt", str(tmp_path), "0", str(SIGTERMS)], env)
    for kind, n in kills.items():
        code, _, err = _finish(_start(["kill", str(tmp_path), kind, str(n)],
                                      {**env, "KCP_TEST_CRASH_AT": f"sidecar_written:{n}"}))
        assert code == -9, err[-3000:]
    code, out, err = _finish(interrupt)
    assert code == 0, err[-3000:]
    chains = json.loads(out.splitlines()[-1])
    assert {kind: chain["chain_max_diff"] for kind, chain in chains.items()} == dict.fromkeys(
        KINDS, 0.0), chains

    code, out, err = _finish(_start(["resume", str(tmp_path)], env))
    assert code == 0, err[-3000:]
    report = json.loads(out.splitlines()[-1])
    assert len(report) == len(KINDS) * (SIGTERMS + 1), sorted(report)
    assert {run: r["max_diff"] for run, r in report.items()} == dict.fromkeys(report, 0.0), (
        chains, report)
    # The signals landed all over the three epochs: resumes started in each.
    assert {r["initial_epoch"] for r in report.values()} == {0, 1, 2}
