"""Silencing TensorFlow where its messages are expected and not the user's concern.

Two kinds: the Python-side warnings of its logger (quiet_tensorflow), and the C++ start-up lines (absl's
"All log messages before absl::InitializeLog()", oneDNN, CUDA probes) that TensorFlow writes straight to file
descriptor 2, where no Python setting reaches them and TF_CPP_MIN_LOG_LEVEL does not either (they are logged
before absl is initialised). native_stderr_to sends that descriptor to a log file for a while.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import BinaryIO, Iterator

# tf.get_logger() is this logger; naming it keeps this module free of a TensorFlow import, so run_all.py can use
# native_stderr_to around the import that prints the start-up lines.
TF_LOGGER = "tensorflow"


@contextlib.contextmanager
def quiet_tensorflow() -> Iterator[None]:
    """Raise TensorFlow's logger to ERROR inside the block (profiler deprecations, deliberate retracing)."""
    logger = logging.getLogger(TF_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def native_stderr_to(target: BinaryIO) -> Iterator[None]:
    """Inside the block, everything written to file descriptor 2 — C++ logging and Python's sys.stderr alike —
    goes to `target` (an open binary file). An exception raised in the block is printed after it, as usual."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        target.flush()
        os.dup2(saved, 2)
        os.close(saved)
