"""User-facing errors: one message naming the problem and the fix; the CLI turns them into exit code 2."""

from __future__ import annotations

__all__ = ["SinklessError"]


class SinklessError(Exception):
    """A problem the user can fix (bad input, missing package, unsupported model).

    ``str(error)`` is the problem and, on a second line, the fix.
    """

    def __init__(self, problem: str, *, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
