import pytest

from fedsim.atomic import atomic_dir, atomic_file


class Crash(Exception):
    pass


def test_file_appears_only_when_the_block_succeeds(tmp_path):
    path = tmp_path / "sub" / "out.csv"  # a missing parent is created
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".out.csv.")
        assert tmp.name.endswith(".tmp")
        tmp.write_text("new")
        assert not path.exists()
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["out.csv"]


def test_file_suffix_names_the_temporary(tmp_path):
    with atomic_file(tmp_path / "fig.png", suffix=".png") as tmp:
        assert tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert (tmp_path / "fig.png").read_bytes() == b"png"


def test_failed_file_write_keeps_the_old_content_and_no_temporary(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("old")
    with pytest.raises(Crash), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise Crash
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_directory_swap_replaces_the_old_directory_whole(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("from the old run")
    (out / "summary.json").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".run.tmp-")
        (tmp / "summary.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    assert (out / "summary.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # neither .tmp- nor .old- is left


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("old")
    with pytest.raises(Crash), atomic_dir(out, fsync=True) as tmp:
        (tmp / "summary.json").write_text("half")
        raise Crash
    assert (out / "summary.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_fsync_writes_the_same_directory(tmp_path):
    with atomic_dir(tmp_path / "ckpt", fsync=True) as tmp:
        (tmp / "nested").mkdir()
        (tmp / "nested" / "state.json").write_text("{}")
    assert (tmp_path / "ckpt" / "nested" / "state.json").read_text() == "{}"


def test_without_replace_an_existing_directory_wins(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out, replace=False) as tmp:
        (tmp / "config.json").write_text("ours")
        out.mkdir()  # a concurrent build finishes first
        (out / "config.json").write_text("theirs")
    assert (out / "config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
