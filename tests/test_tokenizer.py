import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from gru_nlp.tokenizer import PAD_ID, UNK_ID, encode, load_tokenizer, save_tokenizer, train_tokenizer

TEXTS = [
    "A wonderful film.<br /><br />The acting is superb!",
    "A dull film. The plot is a mess<br/>and the ending is worse.",
    "Wonderful, wonderful acting; a superb ending.",
    "The worst film of the year: dull, dull, dull.",
] * 3


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(TEXTS, vocab_size=120, min_frequency=1)


def word_tokenizer(num_words: int) -> Tokenizer:
    """Maps `w0 w1 ...` to ids 2, 3, ... so truncation can be checked id by id."""
    vocab = {"[PAD]": PAD_ID, "[UNK]": UNK_ID} | {f"w{i}": i + 2 for i in range(num_words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


@pytest.mark.parametrize("model", ["wordpiece", "bpe"])
def test_special_tokens_have_fixed_ids(model):
    tokenizer = train_tokenizer(TEXTS, vocab_size=80, model=model, min_frequency=1)
    assert tokenizer.token_to_id("[PAD]") == PAD_ID == 0
    assert tokenizer.token_to_id("[UNK]") == UNK_ID == 1
    assert tokenizer.get_vocab_size() <= 80


def test_line_breaks_are_removed(tokenizer):
    tokens = tokenizer.encode("great<br />film<BR>really<br/>", add_special_tokens=False).tokens
    assert not any("br" in token or "<" in token for token in tokens)
    assert (
        tokenizer.decode(tokenizer.encode("superb<br /><br />Acting", add_special_tokens=False).ids) == "superb acting"
    )


def test_long_words_and_cjk_text_are_read_not_one_unk():
    tokenizer = train_tokenizer(TEXTS + ["好电影 很好看"], vocab_size=120, min_frequency=1)
    cjk = tokenizer.encode("好电影", add_special_tokens=False).tokens
    assert cjk == ["好", "电", "影"]  # one word per ideograph, as BERT splits them
    long_word = tokenizer.encode("dull" * 30, add_special_tokens=False).ids  # 120 letters, no space
    assert UNK_ID not in long_word and len(long_word) > 1


def test_invisible_format_characters_do_not_turn_a_word_into_unk(tokenizer):
    def tokens(text: str) -> list[str]:
        return tokenizer.encode(text, add_special_tokens=False).tokens

    plain = tokens("a superb film")
    for text in ("\ufeffa superb film", "a \u200bsuperb film", "a su\u00adperb film", "a superb\u200d film"):
        assert tokens(text) == plain, repr(text)


def test_lowercase_is_optional():
    tokenizer = train_tokenizer(TEXTS, vocab_size=120, lowercase=False, min_frequency=1)
    assert "A" in tokenizer.get_vocab()


def test_text_spelling_a_special_token_is_plain_text(tokenizer):
    rebuilt = Tokenizer.from_str(tokenizer.to_str())  # as from a checkpoint
    for tok in (tokenizer, rebuilt):
        assert PAD_ID not in encode(tok, ["a [PAD] film [UNK]"], max_length=20)[0]


def test_saved_tokenizer_reloads_to_identical_ids(tokenizer, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    loaded = load_tokenizer(path)
    assert encode(loaded, TEXTS, max_length=50) == encode(tokenizer, TEXTS, max_length=50)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary file left


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not a valid tokenizer.json"):
        load_tokenizer(broken)


def test_load_rejects_a_tokenizer_without_pad_at_zero(tmp_path):
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "film": 2}, unk_token="[UNK]"))
    tokenizer.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match=r"\[PAD\] at id 0"):
        load_tokenizer(tmp_path / "other.json")


def test_training_needs_texts():
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer([])


def test_head_truncation_keeps_the_first_tokens():
    assert encode(word_tokenizer(20), [" ".join(f"w{i}" for i in range(20))], 8, "head") == [list(range(2, 10))]


def test_head_tail_truncation_keeps_a_quarter_head_and_the_tail():
    (ids,) = encode(word_tokenizer(20), [" ".join(f"w{i}" for i in range(20))], 8, "head_tail")
    assert ids == [2, 3] + list(range(16, 22))  # w0 w1 ... w14 ... w19


def test_short_texts_are_not_truncated():
    assert encode(word_tokenizer(5), ["w0 w1 w2"], 8, "head_tail") == [[2, 3, 4]]


def test_empty_text_encodes_to_unk(tokenizer):
    assert encode(tokenizer, ["", "   ", "<br />"], 8) == [[UNK_ID], [UNK_ID], [UNK_ID]]


def test_encode_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        encode(tokenizer, ["film"], max_length=0)
    with pytest.raises(ValueError, match="truncation"):
        encode(tokenizer, ["film"], max_length=5, truncation="tail")


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.text(max_size=80), min_size=1, max_size=5),
    max_length=st.integers(1, 30),
    truncation=st.sampled_from(["head", "head_tail"]),
)
def test_encode_properties(tokenizer, texts, max_length, truncation):
    full = encode(tokenizer, texts, max_length=10_000, truncation="head")
    for ids, untruncated in zip(encode(tokenizer, texts, max_length, truncation), full, strict=True):
        assert 1 <= len(ids) <= max_length
        assert all(0 < i < tokenizer.get_vocab_size() for i in ids)  # never padding
        if len(untruncated) <= max_length:
            assert ids == untruncated
        else:
            head = max_length if truncation == "head" else max_length // 4
            assert ids == untruncated[:head] + untruncated[len(untruncated) - (max_length - head) :]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_saved_tokenizer_gets_the_permissions_open_gives(tokenizer, tmp_path):
    umask = os.umask(0o022)
    try:
        save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "tokenizer.json").stat().st_mode) == 0o644  # not mkstemp's 0o600
    assert load_tokenizer(tmp_path / "tokenizer.json").to_str() == tokenizer.to_str()
