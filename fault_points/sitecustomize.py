"""Fault points for the tests, loaded at start-up by every Python process the tests start (conftest.py puts
this folder on PYTHONPATH), so that a test can kill or signal a process at one exact step of a file's write.

With $CIFAR100_FAULT_PAUSE set to the start of a label ("written best.pt"), the first step of an atomic write
(cifar100_resnet.atomic_save: a temporary file ending in .partial, renamed over its target) whose label starts
so is announced on stderr as "fault point: LABEL" and paused: for 3 s, or until a signal handler has run (the
signal the test sent has landed; the process then goes on as it would). Labels: "opened NAME" (the temporary
file is open), "written NAME" (its content is on disk, before the rename), "renamed NAME" (renamed over
NAME). Without the variable nothing changes; it is read at each write, so a process forked before it was set
(the tests' command servers) sees it too.
"""

import builtins
import os
import signal
import sys
import time

ENV = "CIFAR100_FAULT_PAUSE"
PAUSE_SECONDS = 3.0
_paused: set = set()  # each label is paused at once per process
_handled: list = []  # one entry per signal handled: a pause ends when this grows


def _pause(label: str) -> None:
    target = os.environ.get(ENV)
    if not target or not label.startswith(target) or target in _paused:
        return
    _paused.add(target)
    print(f"fault point: {label}", file=sys.stderr, flush=True)
    handled, deadline = len(_handled), time.monotonic() + PAUSE_SECONDS
    while len(_handled) == handled and time.monotonic() < deadline:
        time.sleep(0.005)


def _target_of(temporary: str) -> str:
    """The file a temporary one is written for: .NAME.PID.THREAD.partial -> NAME."""
    return os.path.basename(temporary)[1:].rsplit(".", 3)[0]


def _is_temporary(path) -> bool:
    return isinstance(path, str) and path.endswith(".partial") and os.path.basename(path).startswith(".")


_open, _replace, _signal = builtins.open, os.replace, signal.signal


def _open_and_pause(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    if "w" in mode and _is_temporary(file):
        _pause(f"opened {_target_of(file)}")
    return f


def _replace_and_pause(src, dst, *args, **kwargs):
    if not _is_temporary(src):
        return _replace(src, dst, *args, **kwargs)
    _pause(f"written {os.path.basename(dst)}")
    _replace(src, dst, *args, **kwargs)
    _pause(f"renamed {os.path.basename(dst)}")


def _signal_and_note(signum, handler):
    if callable(handler) and not getattr(handler, "_notes_calls", False):
        inner = handler

        def handler(number, frame):
            _handled.append(number)
            return inner(number, frame)

        handler._notes_calls = True
    return _signal(signum, handler)


builtins.open, os.replace, signal.signal = _open_and_pause, _replace_and_pause, _signal_and_note

# This file shadows the environment's own sitecustomize, if it has one (coverage's, a distribution's): run it.
_here = os.path.dirname(os.path.abspath(__file__))
for _folder in sys.path:
    _shadowed = os.path.join(_folder or ".", "sitecustomize.py")
    if os.path.abspath(_folder or ".") != _here and os.path.isfile(_shadowed):
        with _open(_shadowed) as _f:
            exec(compile(_f.read(), _shadowed, "exec"), {"__name__": "sitecustomize", "__file__": _shadowed})
        break
