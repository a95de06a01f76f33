"""Model-parallel throughput of `model_parallel` on the devices present (JAX).

Trains a wide MLP whose blocks are split Megatron-style over a `(DP, MP)`
mesh (`--mesh DPxMP`, default `1xN`: every device on the model axis): each
block's first Dense by columns, its second by rows, so a block costs one
all-reduce over the model axis. The same model with the same global batch
also trains on one device and through `data_parallel` over the same devices.
Reports samples per second after a warm-up (median of timed windows of
`fit`), the speedup over one device, and the parameter bytes each device
holds (what model parallelism buys: a model larger than one device's
memory; `--only-mesh` skips the cases that need it whole on one device).
Writes JSON, a markdown table and a PNG bar chart.

Accelerators: JAX's `jax.devices("gpu")` (or TPUs). Without any, the mesh
runs on DP x MP emulated host devices that share the same cores: that checks
the path works, it says nothing about speed. TensorFlow: Keras 3 has no
model-parallel distribution there; the script records that and exits (run it
with `--backend jax`).

    python benchmarks/model_parallel.py --backend jax [--mesh 2x4] [--width 2048] [--depth 2]
        [--batch 256] [--steps N] [--windows N] [--only-mesh] [--out DIR] [--quick]
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402


def _mesh(text):
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None or 0 in map(int, match.groups()):
        raise ValueError(f"--mesh expects DPxMP such as 1x2 or 2x4. Received: {text!r}")
    return tuple(map(int, match.groups()))


args = _bench.parse_args(
    __doc__.splitlines()[0],
    lambda p: (
        p.add_argument("--mesh", type=_mesh, default=None,
                       help="DPxMP, e.g. 2x4 (default: 1xN over every device)"),
        p.add_argument("--width", type=int, default=2048, help="model width (blocks are 4x wider)"),
        p.add_argument("--depth", type=int, default=2, help="blocks"),
        p.add_argument("--batch", type=int, default=256, help="global batch"),
        p.add_argument("--steps", type=int, default=20, help="steps per timed window"),
        p.add_argument("--windows", type=int, default=3, help="timed windows per case"),
        p.add_argument("--only-mesh", action="store_true",
                       help="skip one device and data_parallel (a model too big for one device)"),
    ),
)
if args.quick:
    args.width, args.depth, args.batch, args.steps, args.windows = 64, 1, 16, 3, 1

NAME = "model_parallel"
if os.environ["KERAS_BACKEND"] != "jax":
    note = ("TensorFlow: Keras 3 has no model-parallel distribution (keras.distribution."
            "ModelParallel is JAX-only); nothing measured. Run with --backend jax.")
    _bench.write_results(args.out, NAME, {"note": note, "rows": [], "quick": args.quick},
                         _bench.markdown_table([], ["case"]) + f"\n\n{note}")
    sys.exit(0)

# Only affects the CPU platform: GPUs, if any, are still found and used.
emulated_count = max(2, (args.mesh[0] * args.mesh[1]) if args.mesh else 2)
flag = f"--xla_force_host_platform_device_count={emulated_count}"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_callbacks_plus import data_parallel, model_parallel  # noqa: E402

accelerators = [d for d in jax.local_devices() if d.platform in ("gpu", "tpu")]
emulated = not accelerators
devices = accelerators or jax.local_devices(backend="cpu")
dp, mp = args.mesh or (1, len(devices))
if dp * mp > len(devices):
    sys.exit(f"--mesh {dp}x{mp} needs {dp * mp} devices; {len(devices)} are present.")
devices = devices[: dp * mp]
names = [f"{d.platform}:{d.id}" for d in devices]
if args.batch % len(devices):
    sys.exit(f"--batch {args.batch} must be a multiple of the {len(devices)} devices.")
LAYOUT = {r"up_\d+/kernel": (None, "model"), r"up_\d+/bias": ("model",),
          r"down_\d+/kernel": ("model", None)}


def make_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((args.width,))
    x = inputs
    for i in range(args.depth):
        h = keras.layers.Dense(4 * args.width, activation="relu", name=f"up_{i}")(x)
        x = keras.layers.Dense(args.width, name=f"down_{i}")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))


def bytes_per_device(model):
    """The most parameter bytes any one device holds."""
    held = {}
    for variable in model.weights:
        for shard in variable.value.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


cases = {} if args.only_mesh else {
    "one device": lambda: make_model(),
    f"data_parallel ({len(devices)})": lambda: data_parallel(make_model(), devices=names),
}
cases[f"model_parallel ({dp}x{mp})"] = lambda: model_parallel(
    make_model(), LAYOUT, devices=names, data_parallel=dp)
rng = np.random.default_rng(0)
x = rng.normal(size=(args.batch * args.steps, args.width)).astype("float32")
y = rng.integers(0, 10, size=len(x))
rows = []
for case, build in cases.items():
    model = build()
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def window(model=model):
        return model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0).history

    seconds = _bench.interleaved({"window": window}, repeats=args.windows, warmup=1)["window"]
    rows.append({"case": case, "samples_per_s": len(x) / _bench.median(seconds),
                 "param_mb_per_device": bytes_per_device(model) / 2**20,
                 "window_seconds": seconds})
    del model
for row in rows:
    row["speedup"] = row["samples_per_s"] / rows[0]["samples_per_s"]

note = (
    f"No accelerator found: {len(devices)} emulated CPU devices that share the same cores. "
    "This checks that model-parallel training runs; it is not a speed measurement."
    if emulated else f"{len(devices)} accelerator(s): {', '.join(names)}."
)
table = _bench.markdown_table(rows, ["case", "samples_per_s", "speedup", "param_mb_per_device"])
json_path = _bench.write_results(
    args.out, NAME,
    {"mesh": [dp, mp], "width": args.width, "depth": args.depth, "global_batch": args.batch,
     "steps": args.steps, "emulated_devices": emulated, "note": note, "rows": rows,
     "quick": args.quick},
    table + f"\n\n{note}",
)

plt = _bench.pyplot()
if plt is not None:
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(9, 4))
    labels = [r["case"] for r in rows]
    speed.bar(labels, [r["samples_per_s"] for r in rows])
    speed.set_ylabel("samples / s")
    memory.bar(labels, [r["param_mb_per_device"] for r in rows], color="tab:orange")
    memory.set_ylabel("parameter MB per device")
    for ax in (speed, memory):
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.suptitle(f"model_parallel, width {args.width}, depth {args.depth}, batch {args.batch}"
                 + (" (emulated CPU devices)" if emulated else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(json_path.with_suffix(".png"), dpi=100)
    print(f"plot: {json_path.with_suffix('.png')}")
