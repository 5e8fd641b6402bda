"""The one base class of the errors a user can act on.

Every stage raises a subclass naming the file, key, line or parameter at fault (ConfigError,
DataError, ModelDirError, TrainError, OptimizeError, ServeError, GenerateError, UploadError,
PipelineError). The command line prints their message and exits 2 (found before Ray started) or
1 (a stage failed); any other exception is a bug and keeps its traceback. They also stay
ValueErrors (RuntimeError for PipelineError) for callers that catch those.
"""

import re


class AigcRayError(Exception):
    """A problem with the inputs, configuration or environment, explained in the message."""


class StorageError(AigcRayError, ValueError):
    """A path or URI that does not hold what was expected (missing, empty, unlistable)."""


class PipelineError(AigcRayError, RuntimeError):
    """The pipeline ran but its result is not acceptable (e.g. the model did not learn), or the
    endpoint it called answered with an error."""


class ModelDirError(AigcRayError, ValueError):
    """A path given as a model directory does not hold a Hugging Face model."""


def root_cause(log: str) -> str:
    """The last exception line of a traceback in `log` ("ValueError: Available memory ..."),
    else the last ERROR line; "" when there is neither."""
    # vLLM prefixes its child processes' lines: "(EngineCore_DP0 pid=81) ValueError: ..."
    line = r"^(?:\(\S+ pid=\d+\)\s+)?(?:[\w.]*\.)?(\w+(?:Error|Exception)): (.+)$"
    errors = re.findall(line, log, re.M)
    errors = [(n, m) for n, m in errors if "See root cause above" not in m]
    if errors:
        name, message = errors[-1]
        return f"{name}: {message.strip()}"
    lines = [x for x in log.splitlines() if re.search(r"\bERROR\b", x) and "root cause" not in x]
    return lines[-1].strip()[-500:] if lines else ""
