"""One exception hierarchy, so callers can catch asyncflow's failures selectively.

Every error names what it is about (operator, column, sample ids, file) so the
message alone tells the user where to look and what to change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class AsyncflowError(Exception):
    """Base class of every error asyncflow raises on purpose."""


class WorkflowValidationError(AsyncflowError):
    """A workflow failed validation; carries every problem found, not just the first.

    Collecting all problems (as Apache Hamilton does) saves the user a fix-rerun
    loop per mistake.
    """

    def __init__(self, workflow: str, problems: Iterable[str]):
        self.workflow = workflow
        self.problems: list[str] = sorted(problems)
        count = len(self.problems)
        noun = "error" if count == 1 else "errors"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"workflow {workflow!r}: {count} {noun} found:\n{lines}")

    def __reduce__(self):  # errors cross process boundaries (Dask): rebuild from our fields
        return (type(self), (self.workflow, self.problems))


class OperatorError(AsyncflowError):
    """An operator failed or returned output that breaks its declared contract."""

    def __init__(self, operator: str, message: str, sample_ids: Sequence[int] = ()):
        self.operator = operator
        self.sample_ids = list(sample_ids)
        shown = ""
        if self.sample_ids:
            head = ", ".join(str(i) for i in self.sample_ids[:10])
            more = f" (+{len(self.sample_ids) - 10} more)" if len(self.sample_ids) > 10 else ""
            shown = f" [samples {head}{more}]"
        self.detail = message
        super().__init__(f"operator {operator!r}: {message}{shown}")

    def __reduce__(self):  # errors cross process boundaries (Dask): rebuild from our fields
        return (type(self), (self.operator, self.detail, self.sample_ids))


class QueueError(AsyncflowError):
    """Bad input to the TransferQueue; raised before anything stored is touched."""


class ConfigError(AsyncflowError):
    """A run or workflow setting is invalid."""
