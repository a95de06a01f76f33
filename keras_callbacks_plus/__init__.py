"""Reusable Keras 3 callbacks for fine-tuning and data- and model-parallel training.

Works with the TensorFlow and JAX backends; never imports PyTorch.
"""

from keras_callbacks_plus import distribute
from keras_callbacks_plus._version import __version__
from keras_callbacks_plus.activations import (
    ActivationLogger,
    intermediate_outputs,
    read_activation_log,
)
from keras_callbacks_plus._preemption import PREEMPTED_EXIT_CODE
from keras_callbacks_plus.checkpoint import Keep, ParallelModelCheckpoint, resume
from keras_callbacks_plus.data import HDF5Sequence
from keras_callbacks_plus.distribute import copy_weights, data_parallel, model_parallel
from keras_callbacks_plus.early_stopping import RobustEarlyStopping
from keras_callbacks_plus.unfreezing import ProgressiveUnfreezing

__all__ = [
    "ActivationLogger",
    "HDF5Sequence",
    "Keep",
    "PREEMPTED_EXIT_CODE",
    "ParallelModelCheckpoint",
    "ProgressiveUnfreezing",
    "RobustEarlyStopping",
    "__version__",
    "copy_weights",
    "data_parallel",
    "distribute",
    "intermediate_outputs",
    "model_parallel",
    "read_activation_log",
    "resume",
]
