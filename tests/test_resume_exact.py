"""A preempted run resumed in a new process ends bit-identical to an uninterrupted one.

For each kind of data (arrays without shuffling, seeded shuffled arrays, a
shuffled HDF5Sequence), tests/workers/resume_exact.py trains a data-parallel
twin over 2 devices with the four callbacks of this package: once without
interruption; then once stopped by SIGTERM at 10 random batches in a row
(each stop resumed in the same process from its preemption checkpoint:
the end of that chain must equal the uninterrupted run); separately, killed
by SIGKILL right after a batch-frequency checkpoint was committed. Then a new
process per kind resumes every one of those checkpoints and trains to the end.
The processes of the three kinds run side by side.
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


@pytest.fixture
def start():
    """Starts tests/workers/resume_exact.py; whatever still runs at the test's end is killed."""
    started = []

    def _start(args, env):
        process = subprocess.Popen([sys.executable, SCRIPT, *args], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        return process

    yield _start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _finish(process, timeout=600):
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out, err


@pytest.mark.slow
def test_interrupted_runs_resume_bit_identically(tmp_path, start):
    env = subprocess_env()  # with the run's XLA compilation cache (conftest.py)
    # One process per kind of data, side by side on the two cores; the SIGKILL runs beside them:
    # 3 epochs of 6 batches, a checkpoint every 3, so the n-th save is at batch 3n.
    interrupts = {kind: start(["interrupt", str(tmp_path), kind, "0", str(SIGTERMS)], env)
                  for kind in KINDS}
    for kind in KINDS:
        n = random.Random(kind).randrange(1, 6)
        code, _, err = _finish(start(["kill", str(tmp_path), kind, str(n)],
                                     {**env, "KCP_TEST_CRASH_AT": f"sidecar_written:{n}"}))
        assert code == -9, err[-3000:]
    chains = {}
    for kind, process in interrupts.items():
        code, out, err = _finish(process)
        assert code == 0, err[-3000:]
        chains[kind] = json.loads(out.splitlines()[-1])
    assert {kind: chain["chain_max_diff"] for kind, chain in chains.items()} == dict.fromkeys(
        KINDS, 0.0), chains

    # Then each kind's checkpoints resumed in a new process, again side by side.
    resumes = {kind: start(["resume", str(tmp_path), kind], env) for kind in KINDS}
    report = {}
    for process in resumes.values():
        code, out, err = _finish(process)
        assert code == 0, err[-3000:]
        report.update(json.loads(out.splitlines()[-1]))
    assert len(report) == len(KINDS) * (SIGTERMS + 1), sorted(report)
    assert {run: r["max_diff"] for run, r in report.items()} == dict.fromkeys(report, 0.0), (
        chains, report)
    # The signals landed all over the three epochs: resumes started in each.
    assert {r["initial_epoch"] for r in report.values()} == {0, 1, 2}
