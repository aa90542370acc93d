"""Silencing TensorFlow's Python-side warnings where they are expected and not the user's concern."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import tensorflow as tf


@contextlib.contextmanager
def quiet_tensorflow() -> Iterator[None]:
    """Raise TensorFlow's logger to ERROR inside the block (profiler deprecations, deliberate retracing)."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
