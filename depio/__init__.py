"""depio: run research pipelines like make, locally or on Slurm.

    from depio import Pipeline, ParallelExecutor, Task, Product, Dependency, task
"""
from .BuildMode import BuildMode
from .Executors import AbstractTaskExecutor, ParallelExecutor, SequentialExecutor, SlurmPilotExecutor, SubmitItExecutor
from .Pipeline import Pipeline
from .Task import Dependency, IgnoredForEq, Product, Task
from .TaskStatus import FAILED_TERMINAL_STATES, SUCCESSFUL_TERMINAL_STATES, TERMINAL_STATES, TaskStatus
from .decorators import task
from .exceptions import (CyclicDependencyException, DependencyNotAvailableException, DependencyNotMetException,
                         DepioError, ProductAlreadyRegisteredException, ProductNotProducedException,
                         ProductNotUpdatedException, TaskNotInQueueException, TaskNotPicklableException,
                         TaskRaisedExceptionException, UnknownStatusException)

__version__ = "0.2.0"

__all__ = ["BuildMode", "AbstractTaskExecutor", "ParallelExecutor", "SequentialExecutor", "SubmitItExecutor",
           "SlurmPilotExecutor", "Pipeline", "Task",
           "Product", "Dependency", "IgnoredForEq", "TaskStatus", "TERMINAL_STATES", "SUCCESSFUL_TERMINAL_STATES",
           "FAILED_TERMINAL_STATES", "task", "DepioError", "CyclicDependencyException",
           "DependencyNotAvailableException", "DependencyNotMetException", "ProductAlreadyRegisteredException",
           "ProductNotProducedException", "ProductNotUpdatedException", "TaskNotInQueueException",
           "TaskNotPicklableException", "TaskRaisedExceptionException", "UnknownStatusException"]
