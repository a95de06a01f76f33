"""One worker running a README block, started by tests/test_readme.py.

Usage: readme_block.py CODE_FILE WORK_DIR. The block gets `addresses` and
`worker_index` from KCP_WORKER_ADDRESSES and KCP_WORKER_INDEX, runs in
WORK_DIR, and this prints one JSON line with a digest of `model`'s weights.
"""

import os
import sys

from _worker import report, weights_digest, worker_addresses, worker_index

code_file, work_dir = sys.argv[1:3]
os.chdir(work_dir)
# The block joins the job itself, from these two names.
namespace = {"__name__": "__readme__", "addresses": worker_addresses(),
             "worker_index": worker_index()}
with open(code_file) as f:
    exec(compile(f.read(), code_file, "exec"), namespace)

from keras_callbacks_plus import distribute  # noqa: E402

report(
    is_chief=distribute.is_chief(),
    num_workers=distribute.num_workers(),
    digest=weights_digest(namespace["model"].get_weights()),
)
