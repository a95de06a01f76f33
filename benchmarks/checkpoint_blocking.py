"""How long a checkpoint save blocks training, the CPU its write costs, and what saving every epoch costs `fit`.

A ~25 M-parameter MLP with Adam state (a ~300 MB `.keras` file), saved with
`keras.callbacks.ModelCheckpoint`, ParallelModelCheckpoint synchronous
(`async_save=False`), ParallelModelCheckpoint async (the default), and
`keras.callbacks.OrbaxCheckpoint` where orbax-checkpoint is installed. Three
measures, each interleaved in one run (see `_bench.rounds`):

* Blocking: each callback's epoch hooks are driven on one trained model and
  the time its `on_epoch_end` keeps the training thread is taken. Before each
  save the page cache is flushed (`os.sync`) and the host rests `--pause`
  seconds, so no save pays for the one before; an async save's write is
  waited for (untimed) before the next case. For the async save the
  blocking time is the copy of weights and optimizer state to host memory.
  The first save of each callback learns the file layout and is left out
  (it is reported apart).
* Writer CPU per save: the CPU time of ParallelModelCheckpoint's write job
  (`CheckpointWriter.write`), taken with `time.thread_time()` in the thread
  that runs it, split into its steps (the arrays into the h5 file, the zip's
  CRC, fsync, sidecar, ...). The steps are timed by wrapping the package's
  functions in this process; the package itself is unchanged. Also: the
  process CPU time of every case from the start of a save until its file is
  written (ModelCheckpoint's save, ours sync, ours async with its writer).
* `fit` overhead: real `fit` runs, bare, and with a save every epoch by
  ModelCheckpoint, ours sync and ours async; one warm model per case, a
  fresh callback per `fit` (as a user makes one), `--rounds` interleaved
  rounds, each overhead a per-round ratio to the bare `fit` of the same
  round with a 95 % confidence interval. Files are flushed and deleted
  between fits, untimed. ModelCheckpoint does not fsync its file; ours does
  (a durable commit).

Targets on a CPU host (issue #17): async blocking <= 0.10x ModelCheckpoint's;
sync blocking <= 1.0x; writer CPU per save <= 0.5x ModelCheckpoint's blocking
time; `fit` overhead of ours async <= 0.5x ModelCheckpoint's and never above
ours sync. On a host with a GPU or TPU: `fit` overhead of ours async <= 3.5 %,
with epochs sized to last `--epoch-seconds` (default 5 s there; on a CPU host
an epoch is `--steps` steps, ~6 s on JAX, ~17 s on TensorFlow on 2 cores).

    python benchmarks/checkpoint_blocking.py [--backend jax] [--quick] [--out DIR]
"""

from __future__ import annotations

import functools
import gc
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's package

import _bench  # noqa: E402  (sets KERAS_BACKEND before keras is imported)

NAME = "checkpoint_blocking"
MC, SYNC, ASYNC, ORBAX = ("keras.ModelCheckpoint", "ParallelModelCheckpoint sync",
                          "ParallelModelCheckpoint async", "keras.OrbaxCheckpoint")
BARE = "bare fit"
FLOOR = "floor: the same bytes, raw write + fsync"
OURS = (SYNC, ASYNC)
ACCELERATOR_EPOCH_SECONDS = 5.0


def _add_flags(parser):
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed fit rounds")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (saves) per fit")
    parser.add_argument("--steps", type=int, default=12, help="steps per epoch (CPU host)")
    parser.add_argument("--epoch-seconds", type=float, default=None,
                        help="size epochs to last this long instead of --steps (default: "
                             f"{ACCELERATOR_EPOCH_SECONDS:g} s on a GPU/TPU host, off on CPU)")
    parser.add_argument("--saves", type=int, default=5, help="timed saves per callback")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of rest before each save")


class Probe:
    """Thread CPU and wall time of the write job and its steps, per save.

    Wraps functions of the package in this process (`wrap`): the job
    (`CheckpointWriter.write`) is recorded with the thread it ran on and the
    steps called directly under it; a function called outside any job (the
    snapshot, waiting for the writer) is recorded apart, on the caller's
    thread. Records carry `tag`, set by the benchmark before each save or fit.
    """

    def __init__(self):
        self.tag = None
        self.jobs: list[dict] = []
        self.calls: list[dict] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)

    def wrap(self, owner, attribute: str, phase: str, job: bool = False) -> None:
        original = getattr(owner, attribute)
        probe = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            depth = getattr(probe._local, "depth", 0)
            if job:
                probe._local.phases = {}
            probe._local.depth = depth + 1
            tag, cpu, wall = probe.tag, time.thread_time(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                probe._local.depth = depth
                probe._record(phase, job, depth, tag, cpu, wall)
                if job:
                    del probe._local.phases

        setattr(owner, attribute, wrapper)

    def _record(self, phase, job, depth, tag, cpu, wall):
        thread = threading.current_thread()
        if job:
            record = {"tag": tag, "thread": "training" if thread is threading.main_thread()
                      else "writer", "cpu": cpu, "wall": wall, "phases": self._local.phases}
            with self._done:
                self.jobs.append(record)
                self._done.notify_all()
        elif depth == 1 and hasattr(self._local, "phases"):  # directly under the job
            spent = self._local.phases.setdefault(phase, [0.0, 0.0])
            spent[0] += cpu
            spent[1] += wall
        elif depth == 0:
            with self._lock:
                self.calls.append({"tag": tag, "phase": phase, "cpu": cpu, "wall": wall,
                                   "thread": thread.name})

    def wait_for_job(self, tag, timeout: float = 600.0) -> dict:
        """The job record of `tag`, once its write finished."""
        with self._done:
            found = self._done.wait_for(lambda: [j for j in self.jobs if j["tag"] == tag], timeout)
        if not found:
            raise TimeoutError(f"no checkpoint write for {tag} within {timeout} s")
        return found[-1]

    def calls_of(self, tag, phase: str) -> list[dict]:
        with self._lock:
            return [c for c in self.calls if c["tag"] == tag and c["phase"] == phase]


def install_probe() -> Probe:
    from keras_callbacks_plus import _async, _commit, _keras_format, _snapshot, _storage, _writer

    probe = Probe()
    probe.wrap(_writer.CheckpointWriter, "write", "write job", job=True)
    probe.wrap(_writer.CheckpointWriter, "_prepare", "layout model (learned at a fit's first save)")
    probe.wrap(_writer.CheckpointWriter, "_full_save", "Model.save fallback")
    probe.wrap(_keras_format, "write_h5", "h5: arrays into model.weights.h5")
    probe.wrap(_keras_format, "_crc32_of_region", "zip CRC-32 of the h5 member")
    probe.wrap(_storage, "_fsync_file", "fsync")
    probe.wrap(_storage, "_fsync_dir", "fsync")
    probe.wrap(_commit, "write_sidecar", "sidecar (its own fsync included)")
    probe.wrap(_writer, "_save_npz", "state arrays")
    probe.wrap(_snapshot.Snapshotter, "take", "snapshot")
    probe.wrap(_async.AsyncWriter, "wait_until_finished", "waiting for the writer")
    return probe


def main() -> None:
    args = _bench.parse_args(__doc__.splitlines()[0], _add_flags)
    import keras
    import numpy as np

    from keras_callbacks_plus import ParallelModelCheckpoint

    probe = install_probe()
    if args.quick:
        args.rounds, args.epochs, args.steps, args.saves, args.pause = 1, 2, 2, 1, 0.05
        width, inputs, batch = 128, 64, 32
    else:
        width, inputs, batch = 4096, 2048, 256  # 2048*4096 + 4096*4096 + 4096*10: ~25.2 M
    accelerator = _bench.has_accelerator()
    epoch_seconds = args.epoch_seconds
    if epoch_seconds is None and accelerator and not args.quick:
        epoch_seconds = ACCELERATOR_EPOCH_SECONDS
    load_start = _bench.load_average()
    print(f"load average at start: {load_start}")

    def make_model():
        keras.utils.set_random_seed(0)
        x_in = keras.Input((inputs,))
        h = keras.layers.Dense(width, activation="relu")(x_in)
        h = keras.layers.Dense(width, activation="relu")(h)
        model = keras.Model(x_in, keras.layers.Dense(10)(h))
        model.compile(optimizer="adam",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    rng = np.random.default_rng(0)
    distinct = 16  # batches of data, reused however long an epoch is
    x = rng.normal(size=(distinct, batch, inputs)).astype("float32")
    y = rng.integers(0, 10, size=(distinct, batch)).astype("int32")

    class Batches(keras.utils.PyDataset):
        def __init__(self, steps):
            super().__init__()
            self.steps = steps

        def __len__(self):
            return self.steps

        def __getitem__(self, index):
            return x[index % distinct], y[index % distinct]

    workdir = Path(tempfile.mkdtemp(prefix="kcp-bench-"))

    def callback(name, folder, pattern="{epoch}"):
        folder = workdir / folder
        if name == MC:
            return keras.callbacks.ModelCheckpoint(str(folder / f"mc_{pattern}.keras"))
        if name == SYNC:
            return ParallelModelCheckpoint(str(folder / f"sync_{pattern}.keras"), async_save=False)
        if name == ASYNC:
            return ParallelModelCheckpoint(str(folder / f"async_{pattern}.keras"))
        return keras.callbacks.OrbaxCheckpoint(str(folder / "orbax"))

    names = [MC, SYNC, ASYNC]
    unavailable = {}
    try:
        import orbax.checkpoint  # noqa: F401

        names.append(ORBAX)
    except Exception as error:  # optional dependency
        unavailable[ORBAX] = f"{type(error).__name__}: {error}"[:200]

    try:
        # -- blocking and writer CPU ---------------------------------------------------
        # First uses (imports, code paths) on a tiny model, so that no case pays them.
        tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        tiny.compile(optimizer="adam", loss="mse")
        tiny.fit(np.zeros((2, 4)), np.zeros((2, 2)), verbose=0)
        for name in list(names):
            try:
                cb = callback(name, "warm-up")
                cb.set_model(tiny)
                cb.on_train_begin()
                cb.on_epoch_begin(0)
                cb.on_epoch_end(0, {"loss": 1.0})
                cb.on_train_end()
            except Exception as error:
                unavailable[name] = f"{type(error).__name__}: {error}"[:200]
                names.remove(name)
        shutil.rmtree(workdir / "warm-up", ignore_errors=True)
        model = make_model()
        model.fit(Batches(1), epochs=1, verbose=0)  # builds the optimizer state
        made, setup, setup_cpu = {}, {}, {}
        for name in names:
            try:
                cb = callback(name, "blocking")
                cb.set_model(model)
                cpu, start = time.process_time(), time.perf_counter()
                cb.on_train_begin()
                setup[name] = time.perf_counter() - start
                setup_cpu[name] = time.process_time() - cpu
                made[name] = cb
            except Exception as error:
                unavailable[name] = f"{type(error).__name__}: {error}"[:200]
        # The floor: the same bytes written raw to a new file and fsynced, what
        # any writer of this state pays the kernel on this host.
        state = [np.ascontiguousarray(keras.ops.convert_to_numpy(v))
                 for v in model.weights + model.optimizer.variables]
        floor_cpu = []
        (workdir / "blocking").mkdir(parents=True, exist_ok=True)

        def floor_save(epoch):
            cpu = time.thread_time()
            with open(workdir / "blocking" / f"raw_{epoch}.bin", "wb") as f:
                for array in state:
                    f.write(memoryview(array).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            if epoch:
                floor_cpu.append(time.thread_time() - cpu)

        cases = [*made, FLOOR]
        blocking = {n: [] for n in cases}
        save_cpu = {n: [] for n in cases}
        first = {}
        logs = {"loss": 1.0, "val_loss": 1.0}
        for epoch in range(args.saves + 1):
            for name in cases if epoch % 2 == 0 else cases[::-1]:
                cb = made.get(name)
                if cb is not None:
                    cb.on_epoch_begin(epoch)
                os.sync()  # the save before this one is on disk: no writeback meanwhile
                time.sleep(args.pause)
                probe.tag = ("blocking", name, epoch)
                cpu, start = time.process_time(), time.perf_counter()
                try:
                    if cb is None:
                        floor_save(epoch)
                    else:
                        cb.on_epoch_end(epoch, logs)
                except Exception as error:
                    unavailable[name] = f"{type(error).__name__}: {error}"[:200]
                    made.pop(name)
                    cases.remove(name)
                    continue
                seconds = time.perf_counter() - start
                if name in OURS:
                    probe.wait_for_job(probe.tag)
                cpu = time.process_time() - cpu
                if epoch:
                    blocking[name].append(seconds)
                    save_cpu[name].append(cpu)
                else:
                    first[name] = seconds
        probe.tag = None
        for cb in made.values():
            cb.on_train_end()
        del made, model, state
        gc.collect()
        shutil.rmtree(workdir / "blocking", ignore_errors=True)
        load_blocking = _bench.load_average()

        # -- fit overhead --------------------------------------------------------------
        steps = args.steps
        if epoch_seconds:
            calibration = make_model()
            calibration.fit(Batches(2), epochs=1, verbose=0)  # traces
            n = 4
            while True:
                seconds = _bench.time_call(
                    lambda: calibration.fit(Batches(n), epochs=1, verbose=0).history)
                if seconds > 1.0 or n >= 1 << 16:
                    break
                n *= 4
            steps = max(2, math.ceil(epoch_seconds / (seconds / n)))
            del calibration
            print(f"epochs of {steps} steps (~{epoch_seconds:g} s)")
        data = Batches(steps)
        fit_names = [MC, BARE, ASYNC, SYNC]  # each target's pair sits side by side
        models = {name: make_model() for name in fit_names}

        def run(name):
            def fit():
                probe.tag = ("fit", name, len(runs[name]))
                runs[name].append(None)
                callbacks = [] if name == BARE else [callback(name, name, "{epoch}")]
                return models[name].fit(data, epochs=args.epochs, verbose=0,
                                        callbacks=callbacks).history
            return fit

        runs = {name: [] for name in fit_names}

        def clean():
            os.sync()
            for name in fit_names:
                shutil.rmtree(workdir / name, ignore_errors=True)

        clean()
        times = _bench.rounds({name: run(name) for name in fit_names}, args.rounds,
                              warmup=1, between=clean)
        probe.tag = None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = _bench.load_average()

    # -- figures -----------------------------------------------------------------------
    reference = _bench.median(blocking[MC])
    writer_jobs = {name: [j for j in probe.jobs if j["tag"] and j["tag"][:2] == ("blocking", name)
                          and j["tag"][2] > 0] for name in OURS}
    writer_cpu = {name: [j["cpu"] for j in jobs] for name, jobs in writer_jobs.items()}
    writer_wall = {name: [j["wall"] for j in jobs] for name, jobs in writer_jobs.items()}
    snapshot = {name: [c["wall"] for c in probe.calls if c["phase"] == "snapshot" and c["tag"]
                       and c["tag"][:2] == ("blocking", name) and c["tag"][2] > 0]
                for name in OURS}
    blocking_rows = []
    for name in blocking:
        if not blocking[name]:
            continue
        row = {
            "case": name,
            "on_train_begin_s": setup.get(name),
            "on_train_begin_cpu_s": setup_cpu.get(name),
            "first_save_s": first.get(name),
            "blocking_s": _bench.median(blocking[name]),
            "x_ModelCheckpoint": _bench.median(blocking[name]) / reference,
            "process_cpu_per_save_s": _bench.median(save_cpu[name]),
        }
        if name == FLOOR:
            row["writer_thread_cpu_s"] = _bench.median(floor_cpu)
            row["writer_cpu_x_MC_blocking"] = row["writer_thread_cpu_s"] / reference
        if name in OURS:
            row["snapshot_s"] = _bench.median(snapshot[name])
            row["writer_thread_cpu_s"] = _bench.median(writer_cpu[name])
            row["writer_wall_s"] = _bench.median(writer_wall[name])
            row["writer_cpu_x_MC_blocking"] = row["writer_thread_cpu_s"] / reference
        blocking_rows.append(row)

    # Where the writer's time goes: the async jobs of the blocking measure (the
    # writer alone), and those that ran beside training in the fits.
    def phases_of(jobs):
        phases = sorted({p for j in jobs for p in j["phases"]})
        rows = []
        for phase in phases:
            cpu = [j["phases"].get(phase, [0.0, 0.0])[0] for j in jobs]
            wall = [j["phases"].get(phase, [0.0, 0.0])[1] for j in jobs]
            rows.append({"phase": phase, "cpu_s": _bench.median(cpu), "wall_s": _bench.median(wall)})
        rest_cpu = [j["cpu"] - sum(v[0] for v in j["phases"].values()) for j in jobs]
        rest_wall = [j["wall"] - sum(v[1] for v in j["phases"].values()) for j in jobs]
        rows.append({"phase": "the rest (zip records, config JSON, open, rename, ...)",
                     "cpu_s": _bench.median(rest_cpu), "wall_s": _bench.median(rest_wall)})
        rows.append({"phase": "whole write job", "cpu_s": _bench.median([j["cpu"] for j in jobs]),
                     "wall_s": _bench.median([j["wall"] for j in jobs])})
        return rows

    fit_jobs, seen = [], set()
    for job in probe.jobs:  # a fit's first save also builds the layout: left out
        tag = job["tag"]
        if tag and tag[:2] == ("fit", ASYNC) and tag[2] >= 1:
            if tag in seen:
                fit_jobs.append(job)
            seen.add(tag)
    breakdown = {"alone": phases_of(writer_jobs[ASYNC]),
                 "beside training": phases_of(fit_jobs) if fit_jobs else []}
    if breakdown["beside training"]:
        beside = {r["phase"]: r for r in breakdown["beside training"]}
        for row in breakdown["alone"]:
            other = beside.get(row["phase"], {})
            row["cpu_beside_training_s"] = other.get("cpu_s")
            row["wall_beside_training_s"] = other.get("wall_s")

    bare_wall, bare_cpu = times[BARE]["wall"], times[BARE]["cpu"]
    overheads = {}
    fit_rows = [{"case": BARE, "fit_s": _bench.median(bare_wall), "fit_cpu_s": _bench.median(bare_cpu),
                 "others_cores": _bench.median(times[BARE]["others"])}]
    for name in (MC, SYNC, ASYNC):
        wall = _bench.paired(times[name]["wall"], bare_wall)
        cpu = _bench.paired(times[name]["cpu"], bare_cpu)
        # For information only: the kernel's writeback of the files counts as
        # other work here, so this estimate can err low for the cases that write.
        adjusted = _bench.load_adjusted(times[name]["wall"], bare_wall, times[name]["others"],
                                        times[BARE]["others"])
        overheads[name] = {"wall": wall, "cpu": cpu, "wall_load_adjusted": adjusted}
        waits = [sum(c["wall"] for c in probe.calls_of(("fit", name, i), "waiting for the writer"))
                 for i in range(1, args.rounds + 1)] if name in OURS else None
        fit_rows.append({
            "case": name,
            "fit_s": _bench.median(times[name]["wall"]),
            "overhead": _bench.pct_ci(wall),
            "fit_cpu_s": _bench.median(times[name]["cpu"]),
            "cpu_overhead": _bench.pct_ci(cpu),
            "extra_cpu_per_save_s": (_bench.median(times[name]["cpu"]) - _bench.median(bare_cpu))
            / args.epochs,
            "waiting_for_writer_s": _bench.median(waits) if waits else None,
            "others_cores": _bench.median(times[name]["others"]),
        })

    # -- targets -------------------------------------------------------------------------
    def ratio_target(value, limit, detail):
        return {"max": limit, "measured": value, "pass": bool(value <= limit), "detail": detail}

    targets = {
        "async_blocking_x_ModelCheckpoint": ratio_target(
            _bench.median(blocking[ASYNC]) / reference, 0.10,
            f"{_bench.median(blocking[ASYNC]):.3f} s / {reference:.3f} s"),
        "sync_blocking_x_ModelCheckpoint": ratio_target(
            _bench.median(blocking[SYNC]) / reference, 1.0,
            f"{_bench.median(blocking[SYNC]):.3f} s / {reference:.3f} s"),
        "writer_cpu_per_save_x_ModelCheckpoint_blocking": ratio_target(
            _bench.median(writer_cpu[ASYNC]) / reference, 0.5,
            f"writer thread {_bench.median(writer_cpu[ASYNC]):.3f} s CPU / {reference:.3f} s; "
            f"the floor (raw write + fsync of the same bytes) {_bench.median(floor_cpu):.3f} s "
            f"CPU = {_bench.median(floor_cpu) / reference:.2f}x"),
    }
    # Fit targets from per-round differences: async - 0.5 * ModelCheckpoint's
    # overhead, and async over sync, each with its interval.
    async_oh, mc_oh = overheads[ASYNC]["wall"]["ratios"], overheads[MC]["wall"]["ratios"]
    versus_mc = _bench.median_ci([a - 0.5 * m for a, m in zip(async_oh, mc_oh)])
    versus_sync = _bench.paired(times[ASYNC]["wall"], times[SYNC]["wall"])
    mc_median = overheads[MC]["wall"]["median"]
    targets["async_fit_overhead_x_ModelCheckpoint"] = {
        "max": 0.5,
        "measured": (overheads[ASYNC]["wall"]["median"] / mc_median) if mc_median > 0 else None,
        "pass": bool(versus_mc[0] <= 0),
        "resolved": bool(versus_mc[2] <= 0 or versus_mc[1] > 0),
        "detail": f"async {_bench.pct_ci(overheads[ASYNC]['wall'])} vs ModelCheckpoint "
                  f"{_bench.pct_ci(overheads[MC]['wall'])}; per round async - 0.5 x "
                  f"ModelCheckpoint: {_bench.pct(versus_mc[0])} "
                  f"[{versus_mc[1] * 100:+.1f}, {versus_mc[2] * 100:+.1f}]",
    }
    targets["async_fit_overhead_not_above_sync"] = {
        "max": 0.0,
        "measured": versus_sync["median"],
        "pass": bool(versus_sync["median"] <= 0),
        "resolved": _bench.resolves(versus_sync["median_ci95"], 0.0, 0.0),
        "detail": f"async fit / sync fit - 1 per round: {_bench.pct_ci(versus_sync)}",
    }
    async_gpu = overheads[ASYNC]["wall"]
    targets["async_fit_overhead_accelerator"] = {
        "max": 0.035,
        "measured": async_gpu["median"],
        "applies": accelerator,
        "pass": bool(async_gpu["median"] <= 0.035) if accelerator else None,
        "resolved": _bench.resolves(async_gpu["median_ci95"], 0.035, 0.02),
        "detail": f"{_bench.pct_ci(async_gpu)}"
                  + ("" if accelerator else " (CPU host: the target applies on a GPU/TPU host)"),
    }

    def verdict(target):
        if target["pass"] is None:
            return "n/a"
        word = "PASS" if target["pass"] else "FAIL"
        if target.get("resolved") is False:
            word += " (not resolved: the interval straddles the limit)"
        return word

    target_lines = [f"- {name}: {verdict(t)}: {t['detail']} (max {t['max']:g})"
                    for name, t in targets.items()]
    for name, reason in unavailable.items():
        target_lines.append(f"- {name} unavailable: {reason}")

    parameters = int(make_model().count_params())
    header = (f"{keras.backend.backend()}, {parameters / 1e6:.1f} M parameters + Adam, "
              f"{args.epochs} epochs of {steps} steps (batch {batch}) per fit, {args.rounds} "
              f"rounds, {args.saves} timed saves per callback; load average "
              f"{load_start} at start, {load_blocking} after blocking, {load_end} at end")
    table = "\n\n".join([
        header,
        _bench.markdown_table(blocking_rows, [
            "case", "blocking_s", "x_ModelCheckpoint", "snapshot_s", "process_cpu_per_save_s",
            "writer_thread_cpu_s", "writer_cpu_x_MC_blocking", "writer_wall_s",
            "first_save_s", "on_train_begin_s", "on_train_begin_cpu_s"]),
        "Write job of ours async, median per save (alone / beside training in the fits):",
        _bench.markdown_table(breakdown["alone"], [
            "phase", "cpu_s", "wall_s", "cpu_beside_training_s", "wall_beside_training_s"]),
        "fit, a save every epoch (overhead over bare fit: per-round median [95 % CI]):",
        _bench.markdown_table(fit_rows, [
            "case", "fit_s", "overhead", "fit_cpu_s", "cpu_overhead", "extra_cpu_per_save_s",
            "waiting_for_writer_s", "others_cores"]),
        "Targets:\n" + "\n".join(target_lines),
    ])
    record = {
        "parameters": parameters,
        "epochs": args.epochs,
        "steps_per_epoch": steps,
        "epoch_seconds": epoch_seconds,
        "batch_size": batch,
        "rounds": args.rounds,
        "saves": args.saves,
        "pause_s": args.pause,
        "quick": args.quick,
        "accelerator": accelerator,
        "load_average": {"start": load_start, "after_blocking": load_blocking, "end": load_end},
        "blocking": blocking_rows,
        "writer_breakdown": breakdown,
        "fit": fit_rows,
        "fit_overheads": overheads,
        "raw": {
            "blocking_s": blocking,
            "process_cpu_per_save_s": save_cpu,
            "writer_thread_cpu_s": {**writer_cpu, FLOOR: floor_cpu},
            "writer_wall_s": writer_wall,
            "fit_s": times,
            "writer_jobs": probe.jobs,
        },
        "targets": targets,
        "unavailable": unavailable,
    }
    _bench.write_results(args.out, NAME, record, table)


if __name__ == "__main__":
    main()
