"""bloodcell_lib — shared helpers for the blood-cell transfer-learning notebooks.

Data flows one way: folder → checked manifest → split CSV → tf.data → model → predictions →
metrics/Grad-CAM/cost → results JSON → comparison. Each module holds one of those steps.
Heavy modules (TensorFlow) are imported lazily so `python -m bloodcell_lib --help` stays fast.
"""

import os

# TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notes) drowns the notebook's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bloodcell_lib.classes import CLASSES, canonical_class
from bloodcell_lib.errors import BloodcellError

__version__ = "0.1.0"

__all__ = ["CLASSES", "canonical_class", "BloodcellError", "__version__"]
