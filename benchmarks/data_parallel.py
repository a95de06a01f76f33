"""Data-parallel speedup of `data_parallel` on the devices present.

For k = 1, 2, 4, ... up to every accelerator, trains the same model through
`data_parallel` on the first k devices with a global batch of
per-replica-batch x k, and measures samples per second after a warm-up
(median of several timed windows of `fit`, which returns only once the
device work is done). Reports the speedup over k = 1 and the efficiency
(speedup / k), and writes JSON, a markdown table and a PNG plot against ideal
linear speedup.

Accelerators: TensorFlow's physical GPUs, or JAX's `jax.devices("gpu")`.
Without any, the same path runs on 2 emulated CPU devices (TensorFlow logical
devices, JAX host devices). Emulated devices share the same cores: that
figure checks the path works, it says nothing about speed.

    python benchmarks/data_parallel.py [--backend tensorflow|jax] [--model cnn|mlp|resnet50]
        [--per-replica-batch 64] [--steps N] [--windows N] [--out DIR] [--quick]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

args = _bench.parse_args(
    __doc__.splitlines()[0],
    lambda p: (
        p.add_argument("--model", choices=("cnn", "mlp", "resnet50"), default="cnn"),
        p.add_argument("--per-replica-batch", type=int, default=64),
        p.add_argument("--steps", type=int, default=20, help="steps per timed window"),
        p.add_argument("--windows", type=int, default=3, help="timed windows per device count"),
    ),
)
if args.quick:
    args.steps, args.windows, args.per_replica_batch = 3, 1, 8
    args.model = "mlp" if args.model == "resnet50" else args.model

EMULATED_DEVICES = 2
if os.environ["KERAS_BACKEND"] == "jax":
    # Only affects the CPU platform: GPUs, if any, are still found and used.
    flag = f"--xla_force_host_platform_device_count={EMULATED_DEVICES}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    import jax

    accelerators = [f"gpu:{d.id}" for d in jax.local_devices() if d.platform == "gpu"]
else:
    import tensorflow as tf

    accelerators = [f"gpu:{i}" for i, _ in enumerate(tf.config.list_physical_devices("GPU"))]
    if not accelerators:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * EMULATED_DEVICES
        )

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_callbacks_plus import data_parallel, distribute  # noqa: E402

emulated = not accelerators
devices = accelerators or distribute.list_devices("cpu")[:EMULATED_DEVICES]
counts = [k for k in (2**i for i in range(12)) if k <= len(devices)]
if counts[-1] != len(devices):
    counts.append(len(devices))


def make_model():
    keras.utils.set_random_seed(0)
    if args.model == "mlp":
        inputs = keras.Input((512,))
        x = keras.layers.Dense(1024, activation="relu")(inputs)
        x = keras.layers.Dense(1024, activation="relu")(x)
        return keras.Model(inputs, keras.layers.Dense(10)(x)), (512,)
    if args.model == "resnet50":
        shape = (224, 224, 3)
        return keras.applications.ResNet50(weights=None, input_shape=shape, classes=10), shape
    shape = (32, 32, 3)
    inputs = keras.Input(shape)
    x = inputs
    for filters in (32, 64, 128):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x)), shape


rows = []
for k in counts:
    template, shape = make_model()
    twin = data_parallel(template, devices=devices[:k])
    twin.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    batch = args.per_replica_batch * k
    rng = np.random.default_rng(k)
    x = rng.normal(size=(batch * args.steps, *shape)).astype("float32")
    y = rng.integers(0, 10, size=len(x))

    def window():
        return twin.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0).history

    seconds = _bench.interleaved({"window": window}, repeats=args.windows, warmup=1)["window"]
    samples_per_s = len(x) / _bench.median(seconds)
    rows.append({"devices": k, "global_batch": batch, "samples_per_s": samples_per_s,
                 "window_seconds": seconds})

base = rows[0]["samples_per_s"]
for row in rows:
    row["speedup"] = row["samples_per_s"] / base
    row["efficiency"] = row["speedup"] / row["devices"]

note = (
    f"No accelerator found: {EMULATED_DEVICES} emulated CPU devices that share the same cores. "
    "This checks that data-parallel training runs; it is not a speed measurement."
    if emulated
    else f"{len(devices)} accelerator(s): {', '.join(devices)}."
)
print(note)
table = _bench.markdown_table(rows, ["devices", "global_batch", "samples_per_s", "speedup", "efficiency"])
json_path = _bench.write_results(
    args.out, "data_parallel",
    {"model": args.model, "per_replica_batch": args.per_replica_batch, "steps": args.steps,
     "emulated_devices": emulated, "note": note, "rows": rows, "quick": args.quick},
    table + f"\n\n{note}",
)

plt = _bench.pyplot()
if plt is not None:
    fig, ax = plt.subplots(figsize=(5, 4))
    ks = [r["devices"] for r in rows]
    ax.plot(ks, ks, "--", color="gray", label="ideal (linear)")
    ax.plot(ks, [r["speedup"] for r in rows], "o-", label="measured")
    ax.set_xlabel("devices")
    ax.set_ylabel("speedup over 1 device")
    ax.set_xticks(ks)
    ax.set_title(f"data_parallel, {args.model}, {keras.backend.backend()}"
                 + (" (emulated CPU devices)" if emulated else ""), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(json_path.with_suffix(".png"), dpi=100)
    print(f"plot: {json_path.with_suffix('.png')}")
