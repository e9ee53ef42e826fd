from pathlib import Path

import pytest

from catkit.data import corpus
from catkit.data.corpus import load_corpus, split_files, split_of, stdlib_files, stdlib_root


def test_files_sorted_and_filtered():
    root = stdlib_root()
    files = stdlib_files()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert len(files) > 100
    assert rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    assert not any(set(r.split("/")[:-1]) & corpus.EXCLUDED_DIRS for r in rel)
    assert "os.py" in rel and "json/__init__.py" in rel


def test_split_deterministic_disjoint_covering():
    root = stdlib_root()
    files = stdlib_files()
    train, val = split_files("train"), split_files("val")
    assert split_files("train") == train and split_files("val") == val
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(files)
    assert 0 < len(val) < 0.2 * len(files)
    # the split is a property of the relative path alone (stable hash, not the salted hash())
    assert all(split_of(p.relative_to(root).as_posix()) == "val" for p in val)
    assert split_of("os.py") == split_of("os.py")
    more_val = split_files("val", val_fraction=0.5)
    assert set(val) <= set(more_val)  # a larger fraction only moves files into val


def test_load_corpus_and_max_bytes():
    docs = load_corpus("val")
    assert docs and all(isinstance(d, bytes) and d for d in docs)
    assert load_corpus("val") == docs
    small = load_corpus("train", max_bytes=50_000)
    assert 0 < sum(map(len, small)) <= 50_000
    assert load_corpus("train", max_bytes=50_000) == small
    # whole files only, in corpus order
    full = load_corpus("train")
    it = iter(full)
    assert all(any(d == f for f in it) for d in small)


def test_corpus_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="split"):
        load_corpus("test")
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus("train", max_bytes=0)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus("train", val_fraction=1.5)
    with pytest.raises(ValueError, match="corpus: .* is empty"):
        load_corpus("train", root=tmp_path)
    (tmp_path / "a.py").write_text("x = 1\n" * 100)
    with pytest.raises(ValueError, match="corpus: .* is empty"):
        load_corpus("train", root=tmp_path, max_bytes=10)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "b.py").write_text("y = 2\n")
    (tmp_path / "c.txt").write_text("not python")
    docs = load_corpus("train", root=tmp_path, val_fraction=1e-9)
    assert docs == [b"x = 1\n" * 100]
