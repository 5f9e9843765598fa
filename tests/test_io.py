"""Atomic writes: a crash never leaves a half-written file or directory."""

import pytest

from linearize._io import atomic_dir, write_text


def _writer(text):
    def write(tmp):
        (tmp / "f.txt").write_text(text)

    return write


def test_atomic_dir_replaces_or_keeps_existing(tmp_path):
    target = tmp_path / "out"
    atomic_dir(target, _writer("one"))
    atomic_dir(target, _writer("two"))
    assert (target / "f.txt").read_text() == "two"
    atomic_dir(target, _writer("three"), overwrite=False)
    assert (target / "f.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    def broken(tmp):
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "out", broken)
    assert list(tmp_path.iterdir()) == []


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Temporary files are private (0600/0700); what lands in place follows the umask."""
    import os

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        atomic_dir(tmp_path / "d", lambda t: (t / "f").write_text("y"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_claims_are_reentrant_released_and_leave_nothing_on_failure(tmp_path):
    from linearize._io import _claims, claim_output, releases_output
    from linearize.errors import LinearizeError

    out = tmp_path / "a" / "b"

    @releases_output
    def nested(fail: bool):
        claim_output(out)
        claim_output(out)  # the same run again (e.g. a sweep calling analyze): no self-deadlock
        if fail:
            raise LinearizeError("bad input found after the claim")
        write_text(out / "r.txt", "ok")

    with pytest.raises(LinearizeError):
        nested(True)
    assert not (tmp_path / "a").exists() and not _claims  # created dirs and the lock are gone
    nested(False)
    assert (out / "r.txt").read_text() == "ok" and not _claims
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]  # no lock file left
