"""One place maps failures onto jailcell's exceptions: whatever breaks underneath (the transport to
the jail, the host's own resources, cgroup setup, an error answer of the zygote), a public call
raises a JailcellError subclass that says what to do -- never a bare OSError, EOFError or
BrokenPipeError.  Faults are injected where they would happen."""

from __future__ import annotations

import errno
import os
import sys
import tempfile

import pytest

from jailcell import InputError, JailError, Sandbox
from jailcell._engine import raise_reply_error
from jailcell._host import _jail
from jailcell._host._jail import JailTimeout
from jailcell.backends._base import JAIL_SRC


@pytest.mark.parametrize("reply, exc, words", [
    ({"op": "error", "kind": "input", "type": "FileNotFoundError", "message": "no file 'a.txt'"}, InputError,
     "no file 'a.txt'"),
    ({"op": "error", "kind": "lost", "type": "HeadLost", "message": "the session's state was lost"}, JailError,
     "create a new session"),
    ({"op": "error", "kind": "internal", "type": "RuntimeError", "message": "boom"}, JailError, "jailcell check"),
    # The kind decides, not the class name the jail chose: a forged "ValueError" of unknown kind is a fault.
    ({"op": "error", "kind": "surprise", "type": "ValueError", "message": "m"}, JailError, "could not serve"),
    ({"op": "error", "type": "ValueError", "message": "m"}, JailError, "could not serve"),
    ({"op": "error", "kind": "input", "message": "x" * 100_000}, InputError, "xxxx"),
])
def test_error_answers_map_by_kind(reply, exc, words):
    with pytest.raises(exc, match=words) as info:
        raise_reply_error(reply)
    assert len(str(info.value)) < 2200


@pytest.fixture(scope="module")
def zygote():
    sys.path.insert(0, str(JAIL_SRC))
    try:
        import _sessions
        import zygote

        yield zygote, _sessions
    finally:
        sys.path.remove(str(JAIL_SRC))


@pytest.mark.parametrize("make, kind", [
    (lambda s: s.HeadLost("gone"), "lost"),
    (lambda s: KeyError("no such session 'h9'"), "input"),
    (lambda s: ValueError("bad upload offset -1"), "input"),
    (lambda s: FileNotFoundError(2, "No such file"), "input"),
    (lambda s: IsADirectoryError(21, "Is a directory"), "input"),
    (lambda s: OSError(28, "No space left on device"), "internal"),
    (lambda s: RuntimeError("?"), "internal"),
])
def test_the_zygote_says_what_kind_of_error(zygote, make, kind):
    module, sessions = zygote
    reply = module.error_reply(make(sessions))
    assert reply["op"] == "error" and reply["kind"] == kind
    assert not reply["message"].startswith("'")  # a KeyError's message, not its repr


@pytest.mark.parametrize("fault", [JailTimeout("no answer"), EOFError(), BrokenPipeError(32, "Broken pipe"),
                                   ConnectionResetError(104, "reset")])
def test_a_session_whose_jail_breaks_at_start_is_a_jail_error(monkeypatch, fault):
    def broken(self, obj, timeout=30.0):
        raise fault

    with Sandbox("minimal") as sb:
        monkeypatch.setattr(_jail.Jail, "request", broken)
        with pytest.raises(JailError, match="did not start a session"):
            sb.session()


def test_a_forged_error_answer_is_a_jail_error(monkeypatch):
    with Sandbox("minimal") as sb, sb.session() as s:
        monkeypatch.setattr(_jail.Jail, "request",
                            lambda self, obj, timeout=30.0: {"op": "error", "kind": "?", "type": "KeyError"})
        with pytest.raises(JailError, match="could not serve"):
            s.upload("a.txt", b"x")


def test_missing_files_and_bad_names_are_input_errors():
    with Sandbox("minimal") as sb, sb.session() as s:
        with pytest.raises(InputError, match="nope.txt"):
            s.download("nope.txt")
        s.run("import os; os.mkdir('d')")
        with pytest.raises(InputError):
            s.download("d")
        with pytest.raises(InputError, match="relative"):
            s.download("/etc/passwd")


@pytest.mark.parametrize("err, words", [(errno.EMFILE, "file descriptors"), (errno.ENOSPC, "disk is full")])
def test_the_hosts_own_resources_running_out_is_a_jail_error(monkeypatch, err, words):
    def failing(*args, **kwargs):
        raise OSError(err, "injected")

    real_open = os.open

    def tmpfile_failing(path, flags, *args, **kwargs):  # the jail's log is its first resource: an O_TMPFILE file
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(err, "injected")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", tmpfile_failing)
    monkeypatch.setattr(tempfile, "TemporaryFile", failing)  # where O_TMPFILE fails, tempfile is asked
    with pytest.raises(JailError, match=words):
        Sandbox("minimal", warm=True)


def test_cgroup_setup_failing_is_a_jail_error(monkeypatch):
    from jailcell.backends import get_backend

    backend = get_backend()
    if not backend.cgroups.version:
        pytest.skip("no cgroups on this machine: nothing to fail")

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/sys/fs/cgroup/x")

    monkeypatch.setattr(type(backend.cgroups), "create", refused)
    with pytest.raises(JailError, match="Permission denied"):
        Sandbox("minimal", warm=True)

