"""The small helpers every layer shares: error lines (core.messages) and atomic writes (core.files)."""
import errno

import pytest

from mwt_ray.core.files import DiskFull, atomic_write, atomic_write_text
from mwt_ray.core.messages import MAX_ERROR_CHARS, error_line, first_line, last_line


def test_first_and_last_line_skip_blank_lines_and_strip():
    error = RuntimeError("\n  what went wrong  \n detail\n\n  Traceback line\n  ValueError: the cause \n\n")
    assert first_line(error) == "what went wrong"
    assert last_line(error) == "ValueError: the cause"
    assert error_line(error) == "what went wrong detail Traceback line ValueError: the cause"


def test_an_error_without_a_message_is_named_by_its_class_and_a_text_by_nothing():
    for line in (first_line, last_line, error_line):
        assert line(KeyError()) == "KeyError"
    assert first_line("") == last_line(" \n ") == ""


def test_lines_are_cut_to_their_limit_and_huge_messages_are_not_split_whole():
    huge = ValueError("x" * 10_000_000 + "\nlast")
    assert len(first_line(huge)) <= MAX_ERROR_CHARS
    assert first_line("a" * 500, limit=300) == "a" * 297 + "..."
    assert last_line(huge) == "last"
    assert len(error_line(huge, 200)) == 200


def test_atomic_write_keeps_the_suffix_and_leaves_nothing_else(tmp_path):
    seen = []

    def write(temporary):
        seen.append(temporary)
        temporary.write_text("new")

    path = atomic_write(tmp_path / "sub" / "plot.png", write)
    assert path.read_text() == "new" and seen[0].suffix == ".png" and seen[0].parent == path.parent
    assert sorted(p.name for p in path.parent.iterdir()) == ["plot.png"]


def test_a_failed_atomic_write_keeps_the_old_file_and_says_disk_full(tmp_path):
    path = tmp_path / "results.csv"
    atomic_write_text(path, "old")

    def full(temporary):
        temporary.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull, match="disk full .ENOSPC.: no space left on the device of .* to write results.csv"):
        atomic_write(path, full)
    with pytest.raises(ZeroDivisionError):
        atomic_write(path, lambda temporary: 1 / 0)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]

