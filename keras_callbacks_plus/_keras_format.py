"""Keras's `.keras` and `.weights.h5` files, written from host arrays.

`Model.save` walks the model's object tree and writes every variable into
`model.weights.h5` (groups named after attributes and layers, one `vars`
group per saveable, datasets `"0"`, `"1"`, ...), then zips it with
`config.json` and `metadata.json`. The checkpoint writer needs the same file
for a snapshot of host arrays, without assigning them into a model first. So
the layout is learned from Keras itself, once per model and trainable set
(`learn_layout`: Keras's own traversal, recorded by `_compat`), and each
checkpoint replays it with h5py from the snapshot's buffers (`write_h5`).

The `.keras` archive is written in place (`write_keras`): the two JSON
members, then the local header of `model.weights.h5`, into whose data region
h5py writes directly, then its CRC (read back from the page cache) and the
central directory. The h5 file is never held in memory, and the arrays are
never copied on the way: h5py writes from the snapshot's buffers.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import mmap
import os
import struct
import time
import zlib
from typing import Any, BinaryIO, Sequence

import h5py
import keras
import numpy as np

from keras_callbacks_plus import _compat

CONFIG_NAME = "config.json"
METADATA_NAME = "metadata.json"
WEIGHTS_NAME = "model.weights.h5"


class UnsupportedLayout(ValueError):
    """The model stores something the snapshot does not hold (assets, computed values)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """What Keras writes into `model.weights.h5` for one model and trainable set.

    Attributes:
        groups: `(path, attrs, entries)` in Keras's order; `attrs` is the
            group's metadata (Keras creates such groups even when empty) or
            None; `entries` are `(dataset name, source, index)` with source
            `"weights"` (an index into `model.weights`) or `"optimizer"` (into
            `model.optimizer.variables`).
        config: the model's `config.json` as a dict (with its compile config
            when the model is compiled), or None for weights-only files.
    """

    groups: tuple[tuple[str, dict | None, tuple[tuple[str, str, int], ...]], ...]
    config: dict | None


def learn_layout(model: keras.Model, with_config: bool) -> Layout:
    """The layout of `model`'s saved file, learned from Keras's own saving traversal.

    Args:
        model: a single-device model no other thread uses meanwhile; for the
            optimizer's state to be part of the file, compiled with its
            optimizer built over the trainable variables.
        with_config: also keep `config.json` (for a `.keras` file).

    Raises:
        UnsupportedLayout: a saveable writes assets, or stores a value that is
            not one of the model's or optimizer's variables (quantized or
            LoRA-merged kernels, lookup vocabularies).
    """
    recorded, assets = _compat.record_saving_layout(model)
    if assets:
        raise UnsupportedLayout(f"saveables at {', '.join(map(repr, assets))} write assets")
    sources = {id(v): ("weights", i) for i, v in enumerate(model.weights)}
    optimizer = getattr(model, "optimizer", None)
    for j, variable in enumerate(getattr(optimizer, "variables", None) or []):
        sources.setdefault(id(variable), ("optimizer", j))
    groups = []
    for group in recorded:
        entries = []
        for key, value in group["entries"]:
            source = sources.get(id(value))
            if source is None:
                raise UnsupportedLayout(
                    f"{group['path'] or 'the model'} stores a computed value as {key!r}"
                )
            entries.append((key, *source))
        groups.append((group["path"], group["attrs"], tuple(entries)))
    config = json.loads(_compat.model_config_json(model)) if with_config else None
    return Layout(tuple(groups), config)


def write_h5(target: str | os.PathLike | BinaryIO, layout: Layout,
             weights: Sequence[np.ndarray], optimizer: Sequence[np.ndarray] = ()) -> None:
    """Writes `model.weights.h5` of `layout` from host arrays, as Keras's `H5IOStore` does.

    Args:
        target: a path, or a seekable binary file object.
        layout: from `learn_layout`.
        weights: one array per `model.weights` of the layout's model.
        optimizer: one array per `model.optimizer.variables`; may be empty
            when the layout holds no optimizer entries.
    """
    arrays = {"weights": weights, "optimizer": optimizer}
    with h5py.File(target, "w") as f:
        for path, attrs, entries in layout.groups:
            # As H5IOStore: a group with metadata exists even if it stays empty,
            # one without only once it gets a value.
            group = _vars_group(f, path, attrs) if attrs else None
            for key, source, index in entries:
                if group is None:
                    group = _vars_group(f, path, None)
                value = arrays[source][index]
                if value.dtype.name == "bfloat16":
                    group.create_dataset(key, data=value).attrs["dtype"] = "bfloat16"
                else:
                    group[key] = value


def _vars_group(f: h5py.File, path: str, attrs: dict | None):
    group = f.create_group("vars") if not path else f.create_group(path).create_group("vars")
    for name, value in (attrs or {}).items():
        group.attrs[name] = value
    return group


def config_json(layout: Layout, optimizer: keras.optimizers.Optimizer | None = None) -> str:
    """`config.json` of the layout's model; the compiled optimizer's config as it is now.

    The optimizer's config (its learning rate, say) can change while training
    (callbacks set the rate), so it is serialized anew for each file.
    """
    config = layout.config
    if optimizer is not None and (config.get("compile_config") or {}).get("optimizer"):
        compile_config = dict(config["compile_config"])
        compile_config["optimizer"] = keras.saving.serialize_keras_object(optimizer)
        config = {**config, "compile_config": compile_config}
    return json.dumps(config)


def metadata_json() -> str:
    """`metadata.json`, as Keras writes it."""
    return json.dumps({
        "keras_version": keras.version(),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
    })


def write_keras(path: str | os.PathLike, layout: Layout, config: str,
                weights: Sequence[np.ndarray], optimizer: Sequence[np.ndarray] = ()) -> None:
    """Writes a `.keras` archive at `path`: metadata, config and the weights h5, stored.

    Not fsynced: the caller commits the file (fsync and rename).
    """
    with open(path, "w+b") as f:
        zip_file = _StoredZip(f)
        zip_file.add(METADATA_NAME, metadata_json().encode())
        zip_file.add(CONFIG_NAME, config.encode())
        region = zip_file.open_member(WEIGHTS_NAME)
        write_h5(region, layout, weights, optimizer)
        zip_file.close_member(region.size)
        zip_file.finish()


class _Region(io.RawIOBase):
    """A file object over `f` from byte `offset` on, for h5py's file-object driver."""

    def __init__(self, f: BinaryIO, offset: int):
        super().__init__()
        self._f, self._offset, self._position, self.size = f, offset, 0, 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            position += self._position
        elif whence == os.SEEK_END:
            position += self.size
        self._position = position
        return position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer) -> int:
        self._f.seek(self._offset + self._position)
        count = self._f.readinto(buffer)
        self._position += count
        return count

    def write(self, data) -> int:
        self._f.seek(self._offset + self._position)
        count = self._f.write(data)
        self._position += count
        self.size = max(self.size, self._position)
        return count

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        self._f.truncate(self._offset + size)
        self.size = size
        return size

    def flush(self) -> None:
        self._f.flush()


# Zip records (APPNOTE.TXT 4.3): local header, central directory entry, the
# end of central directory, and their ZIP64 forms for members over 4 GiB.
_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_END = struct.Struct("<4s4H2LH")
_END64 = struct.Struct("<4sQ2H2L4Q")
_LOCATOR64 = struct.Struct("<4sLQL")
_ZIP64_EXTRA = struct.Struct("<2H2Q")
_MAX32 = 0xFFFFFFFF


def _dos_time() -> tuple[int, int]:
    t = time.localtime()
    return ((t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2),
            ((t.tm_year - 1980) << 9) | (t.tm_mon << 4) | t.tm_mday)


class _StoredZip:
    """A zip of stored (uncompressed) members, the last of which may be written in place."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._members: list[tuple[bytes, int, int, int]] = []  # name, offset, size, crc
        self._time, self._date = _dos_time()
        self._open: tuple[bytes, int, int] | None = None

    def add(self, name: str, data: bytes) -> None:
        encoded, offset = name.encode(), self._f.tell()
        crc = zlib.crc32(data)
        self._f.write(_LOCAL.pack(b"PK\x03\x04", 20, 0, 0, self._time, self._date, crc,
                                  len(data), len(data), len(encoded), 0))
        self._f.write(encoded)
        self._f.write(data)
        self._members.append((encoded, offset, len(data), crc))

    def open_member(self, name: str) -> _Region:
        """Starts a member whose size is not known yet; returns the region to write it into."""
        encoded, offset = name.encode(), self._f.tell()
        # ZIP64 sizes in the local header: patched once the member is written.
        self._f.write(_LOCAL.pack(b"PK\x03\x04", 45, 0, 0, self._time, self._date, 0,
                                  _MAX32, _MAX32, len(encoded), _ZIP64_EXTRA.size))
        self._f.write(encoded)
        self._f.write(_ZIP64_EXTRA.pack(1, 16, 0, 0))
        self._open = (encoded, offset, self._f.tell())
        return _Region(self._f, self._open[2])

    def close_member(self, size: int) -> None:
        encoded, offset, start = self._open
        self._open = None
        self._f.flush()
        crc = _crc32_of_region(self._f.fileno(), start, size)
        self._f.seek(offset + 14)
        self._f.write(struct.pack("<L", crc))
        self._f.seek(offset + _LOCAL.size + len(encoded) + 4)
        self._f.write(struct.pack("<2Q", size, size))
        self._f.seek(start + size)
        self._members.append((encoded, offset, size, crc))

    def finish(self) -> None:
        """Writes the central directory (ZIP64 records where offsets or sizes need them)."""
        start = self._f.tell()
        for encoded, offset, size, crc in self._members:
            extra = b""
            fields = []
            if size >= _MAX32:
                fields += [size, size]
            if offset >= _MAX32:
                fields.append(offset)
            if fields:
                extra = struct.pack("<2H", 1, 8 * len(fields)) + struct.pack(
                    f"<{len(fields)}Q", *fields)
            self._f.write(_CENTRAL.pack(
                b"PK\x01\x02", 45 if fields else 20, 45 if fields else 20, 0, 0, self._time,
                self._date, crc, min(size, _MAX32), min(size, _MAX32), len(encoded), len(extra),
                0, 0, 0, 0o600 << 16, min(offset, _MAX32)))
            self._f.write(encoded)
            self._f.write(extra)
        end = self._f.tell()
        count, length = len(self._members), end - start
        if start >= _MAX32:
            self._f.write(_END64.pack(b"PK\x06\x06", _END64.size - 12, 45, 45, 0, 0, count,
                                      count, length, start))
            self._f.write(_LOCATOR64.pack(b"PK\x06\x07", 0, end, 1))
        self._f.write(_END.pack(b"PK\x05\x06", 0, 0, count, count, length,
                                min(start, _MAX32), 0))


def _crc32_of_region(fd: int, start: int, size: int) -> int:
    """CRC-32 of `size` bytes from `start`, read through a memory map (zlib releases the GIL)."""
    if not size:
        return 0
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, start + size - aligned, access=mmap.ACCESS_READ, offset=aligned) as view:
        with memoryview(view) as whole, whole[start - aligned:] as data:
            return zlib.crc32(data)


def read_h5_tree(h5: h5py.File | h5py.Group) -> dict[str, Any]:
    """`{path: (attrs, dtype, shape, bytes) or attrs}` of every group and dataset: for tests."""
    tree: dict[str, Any] = {}

    def visit(name, item):
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in item.attrs.items()}
        if isinstance(item, h5py.Dataset):
            value = item[()]
            tree[name] = (attrs, value.dtype.str, value.shape, np.asarray(value).tobytes())
        else:
            tree[name] = attrs

    h5.visititems(visit)
    return tree
