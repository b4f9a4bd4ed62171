"""Corpora: the document-splitting rules, built-in sources, bad files, and the split's determinism."""

import importlib.util
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from memory_mosaics.data import corpora
from memory_mosaics.data.corpora import is_validation, open_corpus
from memory_mosaics.data.errors import CorpusError


def docs(spec, **kwargs):
    return list(open_corpus(str(spec), **kwargs).documents())


def test_txt_with_endoftext_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First story.\n\nStill first.\n<|endoftext|>\nSecond <|endoftext|> inline.\n<|endoftext|>\n\n")
    assert docs(path) == ["First story.\n\nStill first.", "Second <|endoftext|> inline."]


def test_txt_without_endoftext_splits_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\nPara one\nline two\n\n  \n\nPara two\r\n\nPara three")
    assert docs(path) == ["Para one\nline two", "Para two", "Para three"]


def test_jsonl_objects_strings_and_custom_field(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [{"text": "one"}, "two", {"text": "  "}, {"text": "three", "body": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert docs(path) == ["one", "two", "three"]
    path.write_text(json.dumps({"body": "b1"}) + "\n" + json.dumps({"body": "b2"}))
    assert docs(path, text_field="body") == ["b1", "b2"]
    with pytest.raises(CorpusError, match=r"a\.jsonl:1: .*string field 'text'.*--text-field"):
        docs(path)


def test_jsonl_reports_the_bad_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(CorpusError, match=r"a\.jsonl:2: not valid JSON"):
        docs(path)


def test_format_flag_reads_a_txt_file_as_jsonl(tmp_path):
    path = tmp_path / "traindataset.txt"  # BabiStories ships JSON strings in .txt files
    path.write_text('"story one"\n"story two"\n')
    assert docs(path, fmt="jsonl") == ["story one", "story two"]
    assert docs(path) == ['"story one"\n"story two"']


def test_folder_reads_txt_and_jsonl_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z")
    (tmp_path / "a.jsonl").write_text('"from a"\n')
    (tmp_path / "c.txt").write_text("from c\n\nand c again")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden.txt").write_text("hidden")
    corpus = open_corpus(str(tmp_path))
    assert list(corpus.documents()) == ["from a", "from b/z", "from c", "and c again"]
    assert list(corpus.documents()) == list(corpus.documents())  # re-iterable


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"ok\n\xff\xfe\x00garbage", "not UTF-8 text"), (b"text\x00with nul", "NUL bytes")],
)
def test_binary_files_are_refused(tmp_path, content, message):
    path = tmp_path / "model.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=rf"model\.txt .*{message}"):
        docs(path)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(CorpusError, match=r"'nowhere\.txt' not found.*python-stdlib"):
        open_corpus("nowhere.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match=r"empty\.txt is empty"):
        open_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(CorpusError, match=r"holds no \.txt or \.jsonl files"):
        open_corpus(str(tmp_path / "sub"))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    assert docs(tmp_path / "blank.txt") == []


def test_python_stdlib_is_sorted_and_deterministic():
    corpus = open_corpus("python-stdlib")
    assert corpus.num_documents > 100 and "python-stdlib" in corpus.description
    first = list(islice(corpus.documents(), 5))
    assert first == list(islice(corpus.documents(), 5))
    assert all(doc.strip() for doc in first)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_tinystories_without_datasets_says_which_local_path_to_pass():
    with pytest.raises(CorpusError, match=r"datasets.*offline, pass .*--data .*\.txt"):
        open_corpus("tinystories")


@pytest.mark.skipif(importlib.util.find_spec("py7zr") is not None, reason="py7zr is installed")
def test_babistories_without_py7zr_says_which_local_path_to_pass(tmp_path):
    with pytest.raises(CorpusError, match=r"py7zr.*--data DIR/traindataset\.txt .*--format jsonl"):
        open_corpus("babistories", cache_dir=tmp_path)
    with pytest.raises(CorpusError, match="splits 'train' and 'val'"):
        open_corpus("babistories:test", cache_dir=tmp_path)


def test_babistories_reads_an_already_extracted_archive(tmp_path):
    folder = tmp_path / "babistories"
    folder.mkdir()
    (folder / "traindataset.txt").write_text('"Once upon a time."\n"The end."\n')
    (folder / "valdataset.txt").write_text('"A val story."\n')
    assert docs("babistories", cache_dir=tmp_path) == ["Once upon a time.", "The end."]
    assert docs("babistories:val", cache_dir=tmp_path) == ["A val story."]


def test_validation_split_fraction_and_seed():
    picks = [is_validation(i, seed=0, val_fraction=0.1) for i in range(20_000)]
    assert 0.09 < sum(picks) / len(picks) < 0.11
    other = [is_validation(i, seed=1, val_fraction=0.1) for i in range(20_000)]
    assert picks != other


def test_validation_split_does_not_depend_on_pythonhashseed():
    # This process hashes strings with its own (random unless set) seed; the child with another.
    child_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    package_dir = str(Path(corpora.__file__).parents[1])
    code = (
        # Stand in for the package's __init__, which imports torch (seconds) and is not under test.
        f"import sys, types; pkg = types.ModuleType('memory_mosaics'); pkg.__path__ = [{package_dir!r}];"
        "sys.modules['memory_mosaics'] = pkg;"
        "from memory_mosaics.data.corpora import is_validation;"
        "print(''.join('1' if is_validation(i, 7, 0.3) else '0' for i in range(300)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": child_seed}
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = "".join("1" if is_validation(i, 7, 0.3) else "0" for i in range(300))
    assert child.stdout == here + "\n"
    assert 60 < here.count("1") < 120
