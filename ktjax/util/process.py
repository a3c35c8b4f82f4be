"""How a command line meets the process around it: SIGINT and SIGTERM from the first import to the last byte, and
a stdout that is closed, full or a broken pipe. Imports nothing heavy: the entry points (ktjax/generate.py,
ktjax/convert.py, ktjax/serve/__main__.py) install the handlers before they import JAX.

Exit codes (docs/guarantees.md): 1 an I/O failure (stdout full or closed; quietly on a broken pipe,
as `| head` makes), 2 bad input, 130 interrupted by Ctrl-C (SIGINT) or SIGTERM, with one line `interrupted...`.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import os
import signal
import sys
import threading

EXIT_IO, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_arrived: list[int] = []  # every signal our handlers saw, in this process


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: the same clean stop."""


class OutputFailed(Exception):
    """Writing stdout failed (`error`: the OSError, None when stdout is closed). Not an OSError, so that no
    handler meant for the user's files catches it."""

    def __init__(self, error: OSError | None):
        super().__init__(str(error) if error else "stdout is closed")
        self.error = error


def _handlers():
    """Fresh handlers: the first signal raises (KeyboardInterrupt, or Terminated for SIGTERM); later ones are
    ignored, so that the clean-up the first one started is not cut short by a second Ctrl-C."""
    raised = []

    def handle(signum, frame):
        _arrived.append(signum)
        if not raised:
            raised.append(signum)
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    return {s: handle for s in _SIGNALS}


def interrupted_by(e: BaseException) -> bool:
    """Whether `e` is, or stands for, an interruption: a KeyboardInterrupt, or another error raised after a
    signal arrived (numpy's C import turns a KeyboardInterrupt inside it into an ImportError)."""
    return isinstance(e, KeyboardInterrupt) or bool(_arrived)


def install_signal_handlers() -> dict:
    """Install the handlers in the main thread (elsewhere Python delivers no signals) and return the previous
    ones. A signal the parent ignores (SIGINT for a job started with `&` by a script, or under nohup) stays
    ignored."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _arrived.clear()  # what arrives from now on
    previous = {}
    for sig, handler in _handlers().items():
        current = signal.getsignal(sig)
        if current is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    return previous


@contextlib.contextmanager
def signals_interrupt():
    """SIGINT and SIGTERM raise inside the block (a command's main(), also when called in-process), and the
    previous handlers are back after it."""
    previous = install_signal_handlers()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def import_uninterrupted(*modules: str):
    """Import `modules` (returning the last) with SIGINT and SIGTERM held, then deliver a held one through the
    handler that was in place: a KeyboardInterrupt raised inside a C extension's import comes out as an
    ImportError with a traceback printed (numpy does this) and can leave a module half imported."""
    if threading.current_thread() is not threading.main_thread():
        return [importlib.import_module(m) for m in modules][-1]
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in _SIGNALS if signal.getsignal(s) not in (signal.SIG_IGN, None)}
    try:
        imported = [importlib.import_module(m) for m in modules]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if held:
        handler = previous.get(held[0])
        if callable(handler):
            handler(held[0], None)  # ours raise KeyboardInterrupt or Terminated
        else:
            signal.raise_signal(held[0])  # the default action
    return imported[-1]


def interrupted_line(e: BaseException, what: str = "") -> str:
    """The one line an interrupted command prints: `interrupted`, by what signal, and `what` was kept."""
    term = isinstance(e, Terminated) or (not isinstance(e, KeyboardInterrupt) and _arrived[:1] == [signal.SIGTERM])
    return "interrupted" + (" by SIGTERM" if term else "") + (f": {what}" if what else "")


def run_main(module: str) -> int:
    """What `python -m ktjax.X` runs: handlers first, then the command's module imported (JAX: seconds, during
    which Ctrl-C is common) and its main() run. After main() returns its code, signals are ignored: Python puts
    the default handlers back while it shuts down, and a late SIGTERM would turn exit 0 into 143."""
    _fill_closed_descriptors()
    install_signal_handlers()
    code = EXIT_INTERRUPTED
    try:
        code = import_uninterrupted(module).main()
    except BaseException as e:  # noqa: B036 - an interruption, in whatever form it surfaced
        if not interrupted_by(e) or isinstance(e, SystemExit):
            raise
        _say(interrupted_line(e))
    finally:  # a signal from here on changes nothing (the handlers raise once; these ignore)
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
    try:  # what is still buffered (argparse's --help) meets a broken pipe here, not in Python's exit
        if sys.stdout is not None:
            sys.stdout.flush()
    except (OSError, ValueError) as e:
        failed = report_output_failure(OutputFailed(e if isinstance(e, OSError) else None))
        code = code or failed
    return code


def run_command(module: str, huge_pages: bool = False):
    """The entry points' last line: run_main, then exit with its code. An interrupted command exits at once
    (its clean-up is done and its line printed): Python's own shutdown, with JAX stopped inside a compilation,
    can crash (SIGSEGV) after the message. huge_pages (the commands that run a model): first restart with the
    C heap on transparent huge pages where that can be done (util/heap.py; KTJAX_HUGE_PAGES=0: not)."""
    if huge_pages:
        from ktjax.util.heap import restart_on_huge_pages
        restart_on_huge_pages()
    code = run_main(module)
    if code == EXIT_INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


def _fill_closed_descriptors():
    """A closed stdin, stdout or stderr gets /dev/null under its number, so that no file opened later takes
    that number (and output meant for the terminal lands in a checkpoint). sys.stdout stays None: a command
    that writes there refuses to start (require_stdout). A closed stderr becomes /dev/null."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")


def _say(line: str):
    if sys.stderr is None:  # print(file=None) would write to stdout
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr itself is gone: the exit code says it
        pass


# ---- stdout -------------------------------------------------------------------------------------------------

def require_stdout():
    """Refuse to start work whose result goes to a closed stdout (`>&-`)."""
    if sys.stdout is None:
        raise OutputFailed(None)


def write_out(text: str):
    """Write `text` to stdout and flush it; any failure becomes OutputFailed."""
    if sys.stdout is None:
        raise OutputFailed(None)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:  # EPIPE, ENOSPC, EIO, EBADF
        raise OutputFailed(e) from None
    except ValueError:  # the file object was closed
        raise OutputFailed(None) from None


def report_output_failure(e: OutputFailed) -> int:
    """One line (none for a broken pipe: the reader took what it wanted, as `| head -c 3` does) and exit 1.
    stdout is pointed at /dev/null first, so that Python's own flush at exit has nothing left to fail on."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # no stdout at all
        pass
    if e.error is None or e.error.errno != errno.EPIPE:
        reason = e.error.strerror if e.error is not None and e.error.strerror else str(e)
        _say(f"error: cannot write the output to stdout: {reason}")
    return EXIT_IO
