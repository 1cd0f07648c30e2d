"""One exception family for everything minisae refuses to do, so a caller can catch it in one place.

    import minisae
    try:
        sae = minisae.SAE.load("my_sae")
    except minisae.MinisaeError as e:   # a bad file, a bad argument, a full disk, ...
        print(e)                        # one line that names the file or value and what to do

Every class below also subclasses the builtin exception it stands for (ValueError, FileExistsError,
OSError, ...), so code written against the builtins keeps working. The `minisae` command prints any
MinisaeError as one line on stderr and exits with the error's `exit_status` (2 for anything the
user can fix, 1 for a training run that failed); `--debug` shows the traceback instead.

This module imports nothing from minisae: every layer (sae/, models/, io/, data/, the pipeline)
may raise these errors.
"""

import errno


class MinisaeError(Exception):
    """Base of every error minisae raises on purpose; the message is one line that says what to do."""

    exit_status = 2  # of the `minisae` command


class InputError(MinisaeError, ValueError):
    """A bad argument, option or configuration value (out of range, wrong type, makes no sense)."""


class FileFormatError(MinisaeError, ValueError):
    """A file that is missing pieces, corrupt, of the wrong kind, or beyond a size/shape limit."""


class MissingInputError(MinisaeError, FileNotFoundError):
    """A file or folder the command reads does not exist."""


class OutputExistsError(MinisaeError, FileExistsError):
    """An output folder or file that minisae will not write into or replace (see --overwrite)."""


class StorageError(MinisaeError, OSError):
    """The operating system refused a read or write: disk full, read-only disk, permissions, ..."""


class DependencyError(MinisaeError, RuntimeError):
    """An optional package the chosen option needs (e.g. CuPy for --backend cupy) is missing or unusable."""


class ResourceError(MinisaeError, MemoryError):
    """The work asked for needs more memory than is reasonable or available."""


class CheckpointError(FileFormatError):
    """A training checkpoint is missing, unreadable, truncated or does not fit the config."""


class TrainingError(MinisaeError, RuntimeError):
    """Training cannot go on (non-finite loss, parameters or activations); names the step."""

    exit_status = 1


_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or choose another folder",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another folder",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, expected a file",
}


def storage_error(e, path, doing="write"):
    """A StorageError for the OSError `e` raised while `doing` (e.g. "write") `path`; one line."""
    what = _OS_ADVICE.get(e.errno) or (e.strerror or str(e))
    err = StorageError(e.errno, f"cannot {doing} {path}: {what}")
    err.filename = str(path)
    return err


def one_line(e):
    """The message of exception `e` on one line, naming the path for a bare OSError."""
    if isinstance(e, OSError) and not isinstance(e, MinisaeError) and e.filename:
        what = _OS_ADVICE.get(e.errno) or e.strerror or str(e)
        msg = f"{e.filename}: {what}"
    elif isinstance(e, StorageError):
        msg = e.strerror or str(e)
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split("\n")).strip()
