"""The one exception family of qsdonnx; the CLI maps each to a one-line message and an exit code."""


class QsdError(Exception):
    """Base class. ``exit_code`` is what the command line returns for it."""

    exit_code = 2


class InputError(QsdError):
    """The input model or data cannot be used (missing, unreadable, not ONNX, bad weights)."""


class ConfigError(QsdError, ValueError):
    """An option or combination of options is invalid."""


class OutputError(QsdError):
    """The output cannot be written where asked."""


class ConversionError(QsdError):
    """The model cannot be brought to the opset the lowering needs."""


class ValidationFailed(QsdError):
    """The compressed model misses the accuracy the user asked for."""

    exit_code = 3


class NothingToCompress(QsdError):
    """The model has no weight qsdonnx can compress; nothing is written."""

    exit_code = 4


class StageFailed(QsdError):
    """An unexpected failure inside one stage of the pipeline (a bug, or an input the stage
    does not handle); the message names the stage and the cause, ``-v`` shows the traceback."""

    exit_code = 1
