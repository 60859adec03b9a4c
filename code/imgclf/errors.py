"""Errors a user can meet. Each message names the file, field or value and says what to do.

They subclass the training toolkit's ClientError when it is installed, so that `train` reports them as
a user error (failure file = our message, no traceback) instead of a "Framework Error".
"""

try:
    from sagemaker_training.errors import ClientError as _Base
except ImportError:  # serving image: no training toolkit
    _Base = Exception


class UserError(_Base):
    """Base class: something the user can fix (data, hyperparameters, weights, request)."""


class HyperparameterError(UserError):
    pass


class DataError(UserError):
    pass


class WeightsError(UserError):
    pass


class ExportError(UserError):
    """The exported graph (model.onnx) does not compute what the PyTorch model computes, or cannot be made."""


class CheckpointError(UserError):
    pass


class TrainingDiverged(UserError):
    """No epoch has a finite validation loss (NaN/Inf: the model diverged); nothing is written to the model
    directory."""


class TrainingInterrupted(UserError):
    """SIGTERM arrived (spot interruption, StopTrainingJob); a checkpoint was saved."""


class RuleStop(UserError):
    """A debugging rule configured to stop the job (rules-stop) found its issue."""
