import os
import stat

import pytest

from gru_nlp.files import atomic_write


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_new_file_gets_the_permissions_open_gives_and_a_rewritten_one_keeps_its_own(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "out" / "predictions.jsonl"
        with atomic_write(path) as file:
            file.write("one\n")
        assert path.read_text() == "one\n" and mode(path) == 0o644  # not mkstemp's 0o600
        path.chmod(0o640)
        with atomic_write(path, binary=True, sync=True) as file:
            file.write(b"two\n")
        assert path.read_bytes() == b"two\n" and mode(path) == 0o640
    finally:
        os.umask(umask)


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as file:
            file.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
