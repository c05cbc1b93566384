"""What every module and command line of this project shares, none of it about lesions: one
error type and one way for a command to end, atomic writes, where the project keeps what it makes
for itself (the cache folder), a progress bar, and a quiet import of Keras. The bottom floor: it
imports nothing but the standard library.
"""
import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time

# TensorFlow's C++ log (CUDA probes, XLA notices) buries the one line a user needs. Every module
# imports this one first, so this quiets it everywhere; TF_CPP_MIN_LOG_LEVEL=0 brings it back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def import_keras():
    """`import keras` (and with the default backend, TensorFlow) with the C++ start-up probes that
    TF_CPP_MIN_LOG_LEVEL cannot reach (they print before logging is set up) sent to /dev/null."""
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" or "keras" in sys.modules:
        import keras
        return keras
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf
            tf.config.list_physical_devices("GPU")  # the CUDA probe, done here while it is quiet
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras


# -----------------------------------------------------------------------------
# One way to fail, for every module and command line

class Error(Exception):
    """A problem the user can act on, in one line: `file` (a path, or the flag at fault) and
    `problem`, read together as "<file>: <problem>". A command line prints it as `error: ...` and
    exits with exit_code: 2 for bad input or flags (the default), 1 for a failure during the run
    (an export that fails its checks, say). Reports that list skipped files take the two fields
    apart, so a file is never named twice."""

    def __init__(self, file, problem, exit_code=2):
        super().__init__(f"{file}: {problem}")
        self.file, self.problem, self.exit_code = str(file), problem, exit_code


def one_line(e):
    """An exception as one short line (library messages can run to pages)."""
    return (" ".join(str(e).split()) or type(e).__name__)[:300]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises Error (one line, exit 2) instead of printing its usage block."""

    def error(self, message):
        # argparse says "argument --loss: invalid choice: ..."
        flag, _, problem = message.partition(": ")
        raise Error(flag, problem) if problem else Error(self.prog, message)


def command(main, interrupted="interrupted"):
    """Wrap a CLI's main(argv) -> exit code so that it ends one way: Error -> `error: ...` and its
    exit code; OSError (disk full, no permission) -> one line, 1; Ctrl-C -> 130. No traceback."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except Error as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return e.exit_code
        except OSError as e:
            print(f"error: {e.filename or ''}: {e.strerror or one_line(e)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"error: {interrupted}", file=sys.stderr)
            return 130
    return run


# -----------------------------------------------------------------------------
# Files: written whole or not at all

# Read once (setting it is the only way to read it), for files that mkstemp made private.
UMASK = os.umask(0)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path, suffix=None, durable=True):
    """Yield a temp path beside `path` to write to; on success (fsync and) os.replace it onto
    `path`, on any failure remove it. Readers never see half a file, and a failed write keeps the
    old one. Every file this project writes (cache, checkpoints, logs, masks, reports) goes
    through here."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-",
                               suffix=os.path.splitext(path)[1] if suffix is None else suffix)
    os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp's 0600 would make outputs private
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path, write, durable=True):
    """write(binary file) into a temp file, then rename it onto `path` (see atomic_path)."""
    with atomic_path(path, durable=durable) as tmp, open(tmp, "wb") as f:
        write(f)


def cache_dir(cache=None):
    """Where the project keeps what it makes for itself (the array cache, the built-in synthetic
    set): `cache` (a --cache flag), else $SKIN_UNET_CACHE, else ~/.cache/skin-unet. Never inside a
    data folder, which may be read-only."""
    return (cache or os.environ.get("SKIN_UNET_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "skin-unet"))


def check_writable(out):
    """Make the output folder `out`, clear a killed run's temp files, check that it takes files."""
    try:
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):
            if name.startswith(".tmp-"):
                os.remove(os.path.join(out, name))
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise Error(out, f"output folder is not writable ({e.strerror or e})") from None


# -----------------------------------------------------------------------------
# Progress

class Progress:
    """A one-line stderr progress bar, redrawn at most 10 times a second."""

    def __init__(self, total, label, enabled=True):
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.start = self.last = time.time()
        self.done = 0

    def update(self, n=1):
        self.done += n
        now, tty = time.time(), sys.stderr.isatty()
        # on a terminal redraw in place; in a log file write a line every 10 s at most
        if self.enabled and (now - self.last > (0.1 if tty else 10) or self.done == self.total):
            self.last = now
            filled = int(30 * self.done / self.total)
            rate = self.done / max(now - self.start, 1e-9)
            sys.stderr.write(f"{chr(13) if tty else ''}{self.label} [{'#' * filled}"
                             f"{'.' * (30 - filled)}] {self.done}/{self.total} {rate:.0f}/s"
                             f"{chr(10) if self.done == self.total or not tty else ''}")
            sys.stderr.flush()
