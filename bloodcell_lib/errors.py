"""Our own exception types: each message says what was wrong, where, and what to do."""


class BloodcellError(Exception):
    """Base class of every error this library raises on purpose."""


class DatasetError(BloodcellError):
    """The dataset folder cannot be used as it is."""


class MissingClassError(DatasetError):
    """A class folder is missing or holds no readable image."""


class ImageDecodeError(BloodcellError):
    """A file is not a readable image (corrupt, truncated, empty or another format)."""


class ImageTooLargeError(ImageDecodeError):
    """An image declares more pixels than we agree to decode (a decompression bomb)."""


class SplitError(BloodcellError):
    """A split cannot be made or loaded as asked."""


class ConfigError(BloodcellError):
    """A run parameter is unknown or out of range."""


class WeightsError(BloodcellError):
    """Pretrained weights cannot be obtained (offline, missing file, wrong shape)."""


class ModelError(BloodcellError):
    """A model file cannot be loaded or does not match what the library expects."""


class ProvenanceError(BloodcellError):
    """Artefacts that must belong together do not: a model and a split it was not trained on, or a split and a
    dataset folder that no longer holds the images it names."""


class OutputError(BloodcellError):
    """A result cannot be written: the output path is a file, read-only, full, or another run holds it."""


class TrainingInterrupted(BloodcellError):
    """Training was stopped by the user (Ctrl-C); the finished epochs are saved and a rerun resumes."""

    def __init__(self, message: str, epochs_done: int = 0) -> None:
        super().__init__(message)
        self.epochs_done = epochs_done


class ExecutorError(BloodcellError):
    """The notebook runs cannot be executed as asked: an unknown executor, Ray not installed, no cluster there."""
