"""overunlearn: machine unlearning for overparameterized PyTorch models.

The main entry points::

    from overunlearn import UnlearningProblem, TensorData, RegressionTask, ClassificationTask
    from overunlearn import CausalLMTask, SequenceClassificationTask, PadCollate  # language models
    from overunlearn import Budget, unlearn, create, list_methods
"""

from overunlearn.engine import Budget, StepInfo, UnlearnRecord, UnlearnResult, unlearn
from overunlearn.errors import (
    DataError,
    DatasetNotFoundError,
    NonFiniteLossError,
    OverunlearnError,
    UnknownMethodError,
)
from overunlearn.methods import Method, MethodConfig, create, get_method, list_methods, register_method
from overunlearn.problem import (
    Batch,
    CausalLMTask,
    ClassificationTask,
    PadCollate,
    RegressionTask,
    SequenceClassificationTask,
    Task,
    TensorData,
    UnlearningProblem,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Budget",
    "CausalLMTask",
    "ClassificationTask",
    "DataError",
    "DatasetNotFoundError",
    "Method",
    "MethodConfig",
    "NonFiniteLossError",
    "OverunlearnError",
    "PadCollate",
    "RegressionTask",
    "SequenceClassificationTask",
    "StepInfo",
    "Task",
    "TensorData",
    "UnknownMethodError",
    "UnlearnRecord",
    "UnlearnResult",
    "UnlearningProblem",
    "create",
    "get_method",
    "list_methods",
    "register_method",
    "unlearn",
]
