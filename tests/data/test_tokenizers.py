"""Tokenizers: round trips, GPT-2 offline loading pinned to known ids, save/load, bad input."""

import json
import shutil
from itertools import islice
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory_mosaics.data.corpora import open_corpus
from memory_mosaics.data.errors import TokenizerError
from memory_mosaics.data.tokenizers import (
    EOT_TEXT,
    BPETokenizer,
    ByteTokenizer,
    GPT2Tokenizer,
    load_tokenizer,
    make_tokenizer,
)

GPT2_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gpt2"
needs_gpt2 = pytest.mark.skipif(
    not (GPT2_DIR / "encoder.json").is_file(), reason=f"GPT-2 tokenizer files not found in {GPT2_DIR}"
)

HARD_TEXTS = [
    "",
    "Hello world",
    "héllo wörld, ça va? naïve façade",
    "日本語のテキストと中文",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 with joiners",
    "mixed Ελληνικά русский العربية עברית हिन्दी",
    "tabs\tand\nnewlines\r\n  indented\n\n\nblank",
    f"a literal {EOT_TEXT} inside text",
    "\u200bzero width\ufeff and combining e\u0301",
]
TRAIN_TEXTS = ["the cat sat on the mat. " * 20, "le chat était sur le tapis ", "猫はマットの上に座った"] * 5


@pytest.fixture(scope="module")
def bpe():
    return make_tokenizer("bpe", vocab_size=300, texts=TRAIN_TEXTS)


@pytest.fixture(scope="module")
def bpe_reference(bpe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    bpe.save(folder)
    return _hugging_face_ids(folder)


@pytest.fixture(scope="module")
def gpt2():
    if not (GPT2_DIR / "encoder.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {GPT2_DIR}")
    return make_tokenizer("gpt2", gpt2_dir=GPT2_DIR)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_byte_and_bpe_round_trip_hard_texts(text, bpe):
    for tok in (ByteTokenizer(), bpe):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_byte_round_trip_property(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) == len(text.encode("utf-8"))


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_round_trip_property(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def _hugging_face_ids(folder):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(folder / "bpe.json"))
    hf.encode_special_tokens = True  # like ours: "<|endoftext|>" in text is plain text
    return lambda text: hf.encode(text, add_special_tokens=False).ids


def test_bpe_ids_match_hugging_face_reading_the_saved_file(tmp_path):
    # We train and save with Hugging Face but encode with tiktoken: both must give the same ids.
    sources = [doc[:4000] for doc in islice(open_corpus("python-stdlib").documents(), 40)]
    tok = make_tokenizer("bpe", vocab_size=700, texts=sources[:20])
    tok.save(tmp_path)
    reference = _hugging_face_ids(tmp_path)
    for text in HARD_TEXTS + TRAIN_TEXTS + sources:
        assert tok.encode(text) == reference(text)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from("the cat sat on mat.\n 猫はマ'sé😀"), max_size=60) | st.text(max_size=30))
def test_bpe_ids_match_hugging_face_property(bpe, bpe_reference, text):
    assert bpe.encode(text) == bpe_reference(text)


def test_eot_is_never_parsed_from_text(bpe):
    for tok in (ByteTokenizer(), bpe):
        ids = tok.encode(f"a{EOT_TEXT}b")
        assert tok.eot_id not in ids
        assert tok.decode([*tok.encode("a"), tok.eot_id, *tok.encode("b")]) == f"a{EOT_TEXT}b"


def test_bpe_learns_merges_and_compresses(bpe):
    assert bpe.name == "bpe" and bpe.eot_id == 0 and 257 < bpe.vocab_size <= 300
    assert len(bpe.encode("the cat sat on the mat.")) < len(b"the cat sat on the mat.")


def test_bpe_training_is_deterministic_and_fingerprint_tracks_vocabulary(bpe):
    again = make_tokenizer("bpe", vocab_size=300, texts=TRAIN_TEXTS)
    other = make_tokenizer("bpe", vocab_size=280, texts=TRAIN_TEXTS)
    assert again.fingerprint() == bpe.fingerprint()
    assert other.fingerprint() != bpe.fingerprint()
    assert bpe.fingerprint().startswith("bpe-")


def test_byte_fingerprint_is_pinned():
    # Shards record this string: changing it would make every prepared byte-level data set unreadable.
    assert ByteTokenizer().fingerprint() == "byte-5f19704a6e7a6d77"


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_save_and_load_round_trip(tmp_path, kind, bpe):
    tok = bpe if kind == "bpe" else ByteTokenizer()
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert (again.name, again.vocab_size, again.eot_id) == (tok.name, tok.vocab_size, tok.eot_id)
    assert again.fingerprint() == tok.fingerprint()
    for text in HARD_TEXTS:
        assert again.encode(text) == tok.encode(text)


@needs_gpt2
def test_gpt2_offline_matches_published_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.eot_id) == (50257, 50256)
    assert gpt2.decode([15496, 995, 50256]) == "Hello world" + EOT_TEXT
    assert 50256 not in gpt2.encode(EOT_TEXT)
    for text in HARD_TEXTS:
        assert gpt2.decode(gpt2.encode(text)) == text
    # Pinned: shards written with GPT-2 record this id.
    assert gpt2.fingerprint() == "gpt2-b9b72e1f0e084a70"


@needs_gpt2
def test_gpt2_agrees_with_hugging_face_reading_the_same_files(gpt2):
    # An independent implementation of the same vocabulary: both must split text identically.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    hf = HFTokenizer(models.BPE.from_file(str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    sample = " ".join(HARD_TEXTS[1:7]) + " It's 2024; we'll see 123,456 things!"
    assert gpt2.encode(sample) == hf.encode(sample).ids


@needs_gpt2
def test_gpt2_from_environment_variable(monkeypatch):
    monkeypatch.setenv("MOSAIC_GPT2_DIR", str(GPT2_DIR))
    assert make_tokenizer("gpt2").encode("Hello world") == [15496, 995]


@needs_gpt2
def test_gpt2_saved_folder_reloads_without_the_source(tmp_path, gpt2):
    gpt2.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "encoder.json",
        "tokenizer_config.json",
        "vocab.bpe",
    ]
    assert load_tokenizer(tmp_path / "tok").encode("Hello world") == [15496, 995]
    # A vocabulary that tiktoken downloaded itself has no source folder: it is saved as ranks.
    downloaded_like = GPT2Tokenizer(dict(gpt2._ranks))
    downloaded_like.save(tmp_path / "ranks")
    assert (tmp_path / "ranks" / "gpt2.tiktoken").is_file()
    again = load_tokenizer(tmp_path / "ranks")
    assert again.fingerprint() == gpt2.fingerprint() and again.encode("Hello world") == [15496, 995]


@needs_gpt2
def test_gpt2_refuses_missing_or_corrupt_files(tmp_path):
    with pytest.raises(TokenizerError, match=r"lacks vocab\.bpe"):
        shutil.copy(GPT2_DIR / "encoder.json", tmp_path / "encoder.json")
        make_tokenizer("gpt2", gpt2_dir=tmp_path)
    lines = (GPT2_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    lines[100], lines[101] = lines[101], lines[100]  # swap two merges: ranks no longer match encoder.json
    (tmp_path / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"unmodified encoder\.json"):
        make_tokenizer("gpt2", gpt2_dir=tmp_path)


def test_make_tokenizer_rejects_bad_arguments():
    with pytest.raises(TokenizerError, match="unknown tokenizer 'sentencepiece'"):
        make_tokenizer("sentencepiece")
    for size in (256, 1 << 21, 0, -5):
        with pytest.raises(TokenizerError, match="out of range"):
            make_tokenizer("bpe", vocab_size=size, texts=["abc"])
    with pytest.raises(TokenizerError, match="does not apply to the byte tokenizer"):
        make_tokenizer("byte", vocab_size=1000)


def test_decode_refuses_ids_outside_the_vocabulary(bpe):
    with pytest.raises(TokenizerError, match="outside the byte vocabulary"):
        ByteTokenizer().decode([65, 257])
    with pytest.raises(TokenizerError, match="outside the bpe vocabulary"):
        bpe.decode([bpe.vocab_size])


def test_load_tokenizer_refuses_broken_folders(tmp_path, bpe):
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is missing"):
        load_tokenizer(tmp_path / "nowhere")
    bpe.save(tmp_path / "tok")
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(tmp_path / "tok")
    config_path.write_text(json.dumps({**config, "name": "wordpiece"}))
    with pytest.raises(TokenizerError, match="unknown tokenizer 'wordpiece'"):
        load_tokenizer(tmp_path / "tok")
    config_path.write_text(json.dumps({**config, "fingerprint": "bpe-0000000000000000"}))
    with pytest.raises(TokenizerError, match="fingerprint"):
        load_tokenizer(tmp_path / "tok")
    config_path.write_text(json.dumps(config))
    (tmp_path / "tok" / "bpe.json").write_text('{"model": 3}')
    with pytest.raises(TokenizerError, match="corrupt"):
        load_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "bpe.json").unlink()
    with pytest.raises(TokenizerError, match=r"lacks bpe\.json"):
        load_tokenizer(tmp_path / "tok")


def test_bpe_vocab_may_be_smaller_than_asked_on_a_tiny_corpus():
    tok = BPETokenizer.train(["ab ab ab"], vocab_size=5000)
    assert 257 <= tok.vocab_size < 5000
    assert tok.decode(tok.encode("ab ba")) == "ab ba"


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_gpt2_round_trip_property(gpt2, text):
    ids = gpt2.encode(text)
    assert all(0 <= i < gpt2.vocab_size for i in ids) and gpt2.decode(ids) == text


# -- untrusted tokenizer files: any damage gives a TokenizerError, never another exception ---------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
BPE_PATHS = [
    ("model",), ("model", "type"), ("model", "vocab"), ("model", "merges"), ("model", "merges", 0),
    ("model", "vocab", "<|endoftext|>"), ("model", "vocab", "a"), ("added_tokens",), ("added_tokens", 0),
    ("pre_tokenizer",), ("decoder",), ("normalizer",), ("model", "byte_fallback"),
]  # fmt: skip
CONFIG_KEYS = ["format_version", "name", "vocab_size", "eot_id", "fingerprint", "files", "eot_text"]


def load_tampered(saved: Path, folder: Path, file: str, path: tuple, value):
    """Copy a saved tokenizer, set `path` in its JSON `file` to `value`, and load it: the tokenizer, or
    None when it is refused with a TokenizerError (any other exception fails the test)."""
    shutil.copytree(saved, folder, dirs_exist_ok=True)
    tree = json.loads((folder / file).read_text())
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (folder / file).write_text(json.dumps(tree))
    try:
        return load_tokenizer(folder)
    except TokenizerError:
        return None


@pytest.fixture(scope="module")
def saved_bpe(bpe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved-bpe")
    bpe.save(folder)
    return folder


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(BPE_PATHS), value=JSON_VALUES)
def test_a_tampered_bpe_file_is_refused_cleanly(saved_bpe, tmp_path, path, value):
    tokenizer = load_tampered(saved_bpe, tmp_path / "tok", "bpe.json", path, value)
    if tokenizer is not None:  # loaded: the vocabulary did not change (its fingerprint was checked)
        assert tokenizer.decode(tokenizer.encode("the cat sat")) == "the cat sat"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(CONFIG_KEYS), value=JSON_VALUES)
def test_a_tampered_tokenizer_config_is_refused_cleanly(saved_bpe, tmp_path, key, value):
    original = json.loads((saved_bpe / "tokenizer_config.json").read_text())
    tokenizer = load_tampered(saved_bpe, tmp_path / "tok", "tokenizer_config.json", (key,), value)
    if tokenizer is not None:  # only an unused field, or a value left as it was, may load
        assert key == "eot_text" or value == original.get(key)
        assert tokenizer.fingerprint() == original["fingerprint"]
