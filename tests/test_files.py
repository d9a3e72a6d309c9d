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


def test_a_symbolic_link_is_written_through_to_its_target(tmp_path):
    target = tmp_path / "real.jsonl"
    target.write_text("old")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with atomic_write(link) as file:
        file.write("new")
    assert link.is_symlink() and target.read_text() == "new"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_named_pipe_is_written_to_not_replaced_by_a_file(tmp_path):
    import threading

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()), daemon=True)
    reader.start()
    with atomic_write(pipe) as file:
        file.write("through the pipe")
    reader.join(timeout=10)
    assert received == ["through the pipe"] and stat.S_ISFIFO(os.stat(pipe).st_mode)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux /proc, where no file can be created")
def test_a_folder_that_takes_no_new_files_is_named_in_the_error_not_the_temporary_file():
    with pytest.raises(OSError, match=r"^\[Errno \d+\] cannot write /proc/out.jsonl: "):
        with atomic_write("/proc/out.jsonl") as file:
            file.write("never")


@pytest.mark.skipif(not os.path.exists("/dev/stdout"), reason="/dev/stdout")
def test_dev_stdout_redirected_to_a_file_is_written_into_not_replaced(tmp_path):
    import subprocess
    import sys

    log = tmp_path / "log.txt"
    script = "from gru_nlp.files import atomic_write\nwith atomic_write('/dev/stdout') as f: f.write('written\\n')\nprint('after', flush=True)"
    with open(log, "w") as stdout:
        stdout.write("before\n")
        stdout.flush()
        subprocess.run([sys.executable, "-c", script], stdout=stdout, check=True)
    assert log.read_text() == "before\nwritten\nafter\n"
