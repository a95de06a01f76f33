"""One worker running a README block, started by tests/test_readme.py.

Usage: readme_block.py CODE_FILE WORK_DIR. The block gets `addresses` and
`worker_index` from KCP_WORKER_ADDRESSES and KCP_WORKER_INDEX, runs in
WORK_DIR, and this prints one JSON line with a digest of `model`'s weights.
"""

import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

code_file, work_dir = sys.argv[1:3]
os.chdir(work_dir)
namespace = {
    "__name__": "__readme__",
    "addresses": os.environ["KCP_WORKER_ADDRESSES"].split(","),
    "worker_index": int(os.environ["KCP_WORKER_INDEX"]),
}
with open(code_file) as f:
    exec(compile(f.read(), code_file, "exec"), namespace)

import numpy as np  # noqa: E402

from keras_callbacks_plus import distribute  # noqa: E402

weights = namespace["model"].get_weights()
print(
    json.dumps(
        {
            "is_chief": distribute.is_chief(),
            "num_workers": distribute.num_workers(),
            "digest": hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in weights)).hexdigest(),
        }
    )
)
