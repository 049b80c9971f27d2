"""The one exception type for mistakes a user can make (bad key, path, shape, manifest).

The CLI prints such an error as one line and exits 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; str(error) is the one line shown to them."""


def find_user_error(error: BaseException) -> UserError | None:
    """The UserError behind `error`: itself, or the one a Ray actor, task or training worker raised.

    Ray hands a remote exception back wrapped: a task's in RayTaskError.cause (whose own text is a
    traceback, even where it also subclasses UserError), Ray Train's per rank in
    WorkerGroupError.worker_failures, Ray Data's as the __cause__ of its own error."""
    stack, seen = [error], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException):  # a Ray wrapper: the error is its cause
            stack.append(cause)
            continue
        if isinstance(current, UserError):
            return current
        stack += [current.__cause__, current.__context__, getattr(current, "controller_failure", None),
                  *getattr(current, "worker_failures", {}).values()]
    return None
