"""Atomic writes (``peel_fed.atomic``): files get the mode a plain ``open()`` gives them."""

from __future__ import annotations

import os
import stat

import pytest

from peel_fed.atomic import write_atomic, write_json_atomic, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_written_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
        write_text_atomic(tmp_path / "a.txt", "x")
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        write_atomic(tmp_path / "a.bin", lambda fh: fh.write(b"x"))
        assert os.umask(umask) == umask  # the writers left the umask as it was
    finally:
        os.umask(old)
    want = _mode(tmp_path / "plain.txt")
    assert want == 0o666 & ~umask
    assert [_mode(tmp_path / n) for n in ("a.txt", "a.json", "a.bin")] == [want] * 3


def test_an_explicit_mode_is_set_before_writing_and_replaces_a_file(tmp_path):
    seen = []
    write_text_atomic(tmp_path / "k", "old")

    def write(fh) -> None:
        seen.append(_mode(fh.fileno()))
        fh.write(b"new")

    write_atomic(tmp_path / "k", write, mode=0o600)
    assert seen == [0o600] and _mode(tmp_path / "k") == 0o600
    assert (tmp_path / "k").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # no temporary file left


def test_results_record_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    from peel_fed.atomic import portable_path

    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert portable_path(tmp_path / "repo" / "runs" / "x") == "runs/x"
    assert portable_path(tmp_path / "shared" / "data") == "../shared/data"
    assert portable_path("docs/results") == "docs/results"
    assert portable_path(None) is None and portable_path("") == ""
