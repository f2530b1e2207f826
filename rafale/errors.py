"""The one exception type for mistakes in the user's input, and how an environment fault reads.

Anything raised as `UserError` is printed by the CLI as a single line (no traceback) and exits
with code 2; so is a fault of the machine the user can fix (`environment_problem`: a full disk, an
unwritable RAFALE_HOME). Anything else is a fault inside rafale: one line and exit code 1, and its
traceback with RAFALE_TRACEBACK=1. Internal invariants use `assert`.
"""

import errno
import os
import re

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR)
# What torch's checkpoint writer (PytorchStreamWriter, C++) says when a write fails: it keeps no errno.
TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "file write failed", "unexpected pos")


class UserError(Exception):
    """A problem the user can fix: the message names it and says how."""


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _errno(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    # Rust libraries (safetensors, tokenizers) raise their own types with "... (os error 27)" in the text.
    m = re.search(r"\(os error (\d+)\)", str(e))
    return int(m.group(1)) if m else None


def environment_problem(e: BaseException) -> str | None:
    """The one-line message for an exception caused by the machine (a full disk, a file or directory
    that cannot be written), looking through the exceptions it was raised from; None for others."""
    for cause in _chain(e):
        code = _errno(cause)
        where = f" {cause.filename}" if isinstance(cause, OSError) and cause.filename else ""
        why = os.strerror(code) if code else "write failed"
        if code in FULL or isinstance(cause, RuntimeError) and any(m in str(cause) for m in TORCH_WRITE_FAILED):
            return (f"no space left writing{where or ' to disk'} ({why}); free some space or set RAFALE_HOME "
                    f"to a larger disk, then run the same command again")
        if code in UNWRITABLE:
            return f"cannot write{where} ({why}); make it writable or set RAFALE_HOME to a writable directory"
    return None
