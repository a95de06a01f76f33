"""Carrying out a save that ParallelModelCheckpoint decided: snapshot, states, the write job.

The callback decides what to save, where and what to delete (`checkpoint`,
`_retention`); `Saver.save` takes the host snapshot (`_snapshot`), collects
the states of the fit's callbacks and the arrays they name, and hands one
`_writer.WriteJob` to the background writer (or runs it at once, on
preemption). Writing never happens on the training thread: jobs run on the
writer's thread, or on a fresh one when synchronous, outside the twin's
strategy or distribution scope.
"""

from __future__ import annotations

from typing import Any

import keras

from keras_callbacks_plus import _resume, _storage, _writer, distribute
from keras_callbacks_plus._async import AsyncWriter, run_outside_scopes
from keras_callbacks_plus._base import PlusCallback, callbacks_of, state_keys
from keras_callbacks_plus._retention import Ledger
from keras_callbacks_plus._snapshot import Snapshotter


class Saver:
    """The snapshot buffers, the writer thread and the layout model of one callback.

    Args:
        storage: where the files go.
        weights_only: `.weights.h5` files.
        template_model: the single-device template the files are of, or None.
        async_save: write on a background thread.
        owner: the callback's name, for messages and the thread's name.
    """

    def __init__(self, storage: _storage.Storage, weights_only: bool,
                 template_model: keras.Model | None, async_save: bool, owner: str):
        self.storage = storage
        self.weights_only = weights_only
        self.template_model = template_model
        self.writer = AsyncWriter(f"{owner}-writer", enabled=async_save)
        self.jobs = _writer.CheckpointWriter(storage, weights_only, template_model, owner)
        self.snapshotter = Snapshotter()
        self._to_refresh: tuple | None = None
        self._unprepared: keras.Model | None = None

    def prepare(self, model: keras.Model) -> None:
        """Builds the layout model of the files `model`'s training writes (at train begin).

        A model that is not built yet (a Sequential without an `Input` on
        TensorFlow, built by its first step) has a config without shapes: its
        layout model is built at the first save instead.
        """
        self._unprepared = None
        if self.template_model is None and not model.built:
            self._unprepared = model
            return
        optimizer = getattr(model, "optimizer", None)
        recipe = (keras.saving.serialize_keras_object(self.template_model or model),
                  model.get_compile_config() if optimizer is not None else None)
        self._to_refresh = None
        # Built while the training thread waits: no other draws from the global
        # random states meanwhile, and outside the twin's strategy or distribution.
        with _resume.preserving_random_states():
            run_outside_scopes(lambda: self.jobs.prepare(*recipe))

    def save(self, model: keras.Model, ledger: Ledger, record: dict[str, Any], *,
             target: str | None, last: str | None, writes_last: bool, directory: str,
             entry: dict | None, doomed: list[str], arrays_before: set[str], epoch_rng: dict,
             preemption: bool) -> float:
        """Snapshots `model` and writes (or queues) the job; returns seconds spent waiting.

        `arrays_before`: the state-array files referred to before this save's
        retention decision (`doomed`); those no longer referred to go with it.
        """
        # A write in flight uses the reused host buffers: wait for it, unless
        # the grace period after a signal is running (then spare buffers).
        busy = preemption and self.writer.busy
        waited = 0.0
        if not busy:
            waited = _timed(self.writer.wait_until_finished)
        snapshot = self.snapshotter.take(model, with_optimizer=True, spare=busy)
        if self._unprepared is not None and distribute.is_chief():
            self.prepare(self._unprepared)  # no write is in flight before the first save
        if not distribute.is_chief():
            # Every worker's template holds the trained weights; only the chief writes.
            if self.template_model is not None:
                self.template_model.set_weights(snapshot.weights)
            return waited
        done = record["batches_done"]
        record["trainable"] = snapshot.trainable
        record["resume"] = _resume.resume_record(
            snapshot, done, epoch_rng if done else _resume.random_states())
        siblings = callbacks_of(model)  # all registered by now, none gone yet
        record["callbacks"], arrays, files = self._sibling_states(siblings, ledger, directory)
        if entry is not None:
            entry["arrays"] = files
        if writes_last:
            ledger.last_arrays = files
        doomed_arrays = sorted(arrays_before - ledger.referenced())
        ledger.doomed = (doomed, doomed_arrays)
        optimizer = getattr(model, "optimizer", None)
        job = _writer.WriteJob(
            target=target, last=last, snapshot=snapshot, record=record, arrays=arrays,
            optimizer_config=(keras.saving.serialize_keras_object(optimizer)
                              if optimizer is not None and not self.weights_only else None),
            doomed=doomed, doomed_arrays=doomed_arrays)
        written: list = []
        if preemption:
            waited += _timed(self.writer.wait_until_finished)
            run_outside_scopes(lambda: written.extend(self.jobs.write(job)))
        else:
            self.writer.submit(lambda: written.extend(self.jobs.write(job)))
        if record["batch"] is None:
            # Callbacks listed after this one have not seen this epoch's end yet;
            # their new states go into the sidecar at the next epoch or train end.
            self._to_refresh = (written, record, siblings, entry, ledger, directory)
        return waited

    def _sibling_states(self, siblings: list[PlusCallback], ledger: Ledger,
                        directory: str) -> tuple[dict, dict, list[str]]:
        """The states of the fit's callbacks, the state arrays not written yet, and the
        files the states refer to."""
        states, arrays, files = {}, {}, []
        for key, callback in zip(state_keys(siblings), siblings):
            state, names = callback.get_state(), {}
            for name, (version, values) in callback.state_arrays().items():
                path = self.storage.join(directory, _writer.state_arrays_name(key, name, version))
                names[name] = self.storage.name(path)
                files.append(path)
                if path not in ledger.written:
                    ledger.written.add(path)
                    arrays[path] = list(values)
            states[key] = {**state, "arrays": names} if names else state
        return states, arrays, files

    def refresh_states(self, last_path: str) -> None:
        """Rewrites the last epoch's sidecars if a callback's state changed since the save."""
        if self._to_refresh is None:
            return
        written, record, siblings, entry, ledger, directory = self._to_refresh
        self._to_refresh = None
        before = ledger.referenced()
        states, arrays, files = self._sibling_states(siblings, ledger, directory)
        if states == record["callbacks"]:
            return
        if entry is not None:
            entry["arrays"] = files
        if any(path == last_path for path, _ in written):
            ledger.last_arrays = files
        doomed_arrays = sorted(before - ledger.referenced())
        updated = {**record, "callbacks": states}
        self.writer.submit(lambda: self.jobs.write_sidecars(written, updated, arrays, doomed_arrays))

    def raise_failure(self, owner: str) -> None:
        """Raises, on every worker, a failure of the chief's previous write."""
        if distribute.any_worker(self.writer.failed):
            self.writer.wait_until_finished()
            raise RuntimeError(f"{owner}: the chief's checkpoint writer failed.")


def _timed(fn) -> float:
    import time

    start = time.monotonic()
    fn()
    return time.monotonic() - start
