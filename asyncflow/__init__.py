"""asyncflow: RL post-training of language models as a DAG of operators on Dask.

Light to import: the DSL and the errors are here; models (torch) and the runtime (Dask)
load when their modules are imported (`asyncflow.operators`, `asyncflow.runtime`).
"""

from asyncflow.errors import (
    AsyncflowError,
    ConfigError,
    OperatorError,
    QueueError,
    WorkflowValidationError,
)
from asyncflow.graph import Workflow, WorkflowGraph

__version__ = "0.1.0"

__all__ = [
    "AsyncflowError",
    "ConfigError",
    "OperatorError",
    "QueueError",
    "Workflow",
    "WorkflowGraph",
    "WorkflowValidationError",
    "__version__",
]
