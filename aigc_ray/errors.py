"""The one base class of the errors a user can act on.

Every stage raises a subclass naming the file, key, line or parameter at fault (ConfigError,
DataError, ModelDirError, TrainError, OptimizeError, ServeError, GenerateError, UploadError,
PipelineError). The command line prints their message and exits 2 (found before Ray started) or
1 (a stage failed); any other exception is a bug and keeps its traceback. They also stay
ValueErrors (RuntimeError for PipelineError) for callers that catch those.
"""


class AigcRayError(Exception):
    """A problem with the inputs, configuration or environment, explained in the message."""


class StorageError(AigcRayError, ValueError):
    """A path or URI that does not hold what was expected (missing, empty, unlistable)."""


class ModelDirError(AigcRayError, ValueError):
    """A path given as a model directory does not hold a Hugging Face model."""
