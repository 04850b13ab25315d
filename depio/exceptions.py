"""Exceptions of depio's public API (names as in depio 0.1.x)."""


class DepioError(Exception):
    """Base of every depio error, so callers can catch them all at once."""


class ProductNotProducedException(DepioError):
    """A task finished but one of its products does not exist."""


class ProductNotUpdatedException(DepioError):
    """A task finished but a product that existed before was not rewritten."""


class DependencyNotMetException(DepioError):
    """A path dependency of a task did not exist when the task was about to run."""


class TaskRaisedExceptionException(DepioError):
    """The task's function raised; the original exception is `__cause__` and `.exception`."""

    def __init__(self, exception: BaseException, *args):
        super().__init__(exception, *args)
        self.exception = exception


class UnknownStatusException(DepioError):
    """A status value outside `TaskStatus`."""


class TaskNotInQueueException(DepioError):
    """A task names, in `depends_on`, a task that was not added to the pipeline first."""


class ProductAlreadyRegisteredException(DepioError):
    """Two different tasks claim the same product path."""


class DependencyNotAvailableException(DepioError):
    """A path dependency exists nowhere and no task produces it."""


class CyclicDependencyException(DepioError):
    """The tasks' dependencies form a cycle."""


class TaskNotPicklableException(DepioError):
    """A task's function or an argument cannot be sent to a worker process."""


class WorkerError(DepioError):
    """The runtime lost its workers or could not start them."""


class ProtocolError(DepioError):
    """A message that is not depio's, is of another version, or is wrongly signed."""
