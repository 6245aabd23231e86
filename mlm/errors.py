"""How a command ends on a user error, in one place (run.py and its Hydra callbacks, mlm.predict, mlm.export,
mlm.downstream, mlm.report): `error: <message>` on stderr and exit code 2; the traceback only with --debug.
A user error (mlm.config.UserError: a bad setting, a missing input, a refused run directory) is one the person
at the command line fixes: a traceback would only hide the line."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Optional

from mlm.config import UserError

USER_ERROR = 2  # the exit code of a user error (1 stays Python's, for a crash)


def stderr(line: str) -> None:
    print(line, file=sys.stderr)  # the stderr of the moment (a test's capture included)


def error_code(message: str, say: Optional[Callable[[str], None]] = stderr) -> int:
    """Say `error: <message>` through `say` (None: another process says it); the exit code of a user error."""
    if say is not None:
        say(f"error: {message}")
    return USER_ERROR


def exit_code(work: Callable[[], object], debug: bool = False) -> int:
    """A command's main(): 0 once `work()` returns; a UserError it raises said, and the user error's exit code
    (with `debug`, the error raised instead, with its traceback)."""
    try:
        work()
    except UserError as e:
        if debug:
            raise
        return error_code(str(e))
    return 0


@contextlib.contextmanager
def exit_on_user_error(say: Optional[Callable[[str], None]] = stderr) -> Iterator[None]:
    """Around a step of run.py: a UserError ends the process with the user error's exit code, its line said by `say`."""
    try:
        yield
    except UserError as e:
        sys.exit(error_code(str(e), say))
