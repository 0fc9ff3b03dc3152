"""Progress reporting without printing.

Library functions take a ``progress`` object and call ``progress.task(description, total)`` to get a
task, then ``task.advance(n, **fields)`` and ``task.close()``. The CLI passes a rich progress bar;
library users get :data:`NULL_PROGRESS`, which does nothing, or pass their own.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None: ...

    def update(self, **fields: Any) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None = None) -> Task: ...

    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullProgress:
    """Reports nothing; messages go to the ``dinokit`` logger."""

    def task(self, description: str, total: int | None = None) -> _NullTask:
        return _NullTask()

    def log(self, message: str) -> None:
        logging.getLogger("dinokit").info(message)


NULL_PROGRESS = NullProgress()
