"""Property-based tests: whatever text, bytes or labels the files hold, loading and classifying
either work (keeping every row, or skipping blank texts with a logged count) or fail with a
ValueError that names the file, the split and the row; never a bare traceback from a library.

Loading is tested through `TextDataModule._text_splits`, the lowest level that still reads the
files with `datasets` and applies the row and label rules; each example builds a fresh folder,
so `max_examples` stays small.
"""

import csv
import json
import logging
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gru_nlp.classify import main as classify_main
from gru_nlp.classify import read_texts
from gru_nlp.data import TextDataModule

datasets.disable_progress_bars()

LOADER_SETTINGS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
# Any unicode but surrogates (which UTF-8 cannot hold): newlines, quotes, commas, NUL, emoji, blanks.
TEXTS = st.text(max_size=40)
LABELS = st.sampled_from(["neg", "pos"])
INVALID_UTF8 = st.sampled_from([b"\xff", b"\xc3(", b"\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
# Always present, so both classes have text and the validation file is readable.
ANCHORS = [("a good film", "pos"), ("a bad film", "neg")]


def write_rows(path: Path, rows: list[tuple], fmt: str) -> Path:
    """Write (text, label) rows as .jsonl or .csv, quoting as the csv module does (quotes, newlines)."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": l}, ensure_ascii=False) + "\n" for t, l in rows), "utf-8")
    else:
        with path.open("w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["text", "label"])
            writer.writerows(["" if value is None else value for value in row] for row in rows)
    return path


def text_splits(folder: Path, cache: Path) -> dict[str, datasets.Dataset]:
    module = TextDataModule(str(folder), cache_dir=str(cache), test_split=None, val_split="validation")
    return module._text_splits()


def folder_with(tmp_path_factory, rows: list[tuple], fmt: str) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_rows(folder / f"train.{fmt}", rows, fmt)
    write_rows(folder / f"validation.{fmt}", ANCHORS, fmt)
    return folder


@LOADER_SETTINGS
@given(
    fmt=st.sampled_from(["jsonl", "csv"]),
    rows=st.lists(st.tuples(TEXTS, LABELS), max_size=8),
    duplicates=st.integers(0, 3),
)
def test_every_text_is_kept_exactly_or_skipped_as_blank_with_a_count(tmp_path_factory, caplog, fmt, rows, duplicates):
    rows = ANCHORS + rows + rows[:duplicates]  # duplicated rows are kept as they are
    folder = folder_with(tmp_path_factory, rows, fmt)
    with caplog.at_level(logging.WARNING, logger="gru_nlp.data"):
        caplog.clear()
        train = text_splits(folder, folder / "cache")["train"]
    kept = [(text, label) for text, label in rows if text.strip()]
    names = train.features["labels"].names
    assert [(row["text"], names[row["labels"]]) for row in train] == kept
    skipped = len(rows) - len(kept)
    warnings = [r.getMessage() for r in caplog.records if "Skipped" in r.getMessage()]
    if skipped:
        assert f"Skipped {skipped} of {len(rows)} rows of split 'train'" in warnings[0]
        assert str(folder / f"train.{fmt}") in warnings[0]
    else:
        assert not warnings


@pytest.mark.parametrize("word", ["NA", "null", "nan", "None", "N/A", "#N/A"])
def test_csv_words_that_pandas_calls_missing_are_texts_and_labels(tmp_path_factory, word):
    folder = folder_with(tmp_path_factory, [*ANCHORS, (word, "pos"), ("fine", word)], "csv")
    write_rows(folder / "validation.csv", [*ANCHORS, ("ok", word)], "csv")
    train = text_splits(folder, folder / "cache")["train"]
    assert train["text"] == ["a good film", "a bad film", word, "fine"]
    assert word in train.features["labels"].names


@LOADER_SETTINGS
@given(fmt=st.sampled_from(["jsonl", "csv", "aclImdb"]), bad=INVALID_UTF8, before=TEXTS, row=st.integers(0, 2))
def test_invalid_utf8_is_an_error_naming_the_file_and_line(tmp_path_factory, fmt, bad, before, row):
    folder = tmp_path_factory.mktemp("data")
    if fmt == "aclImdb":
        for label in ("neg", "pos"):
            (folder / "train" / label).mkdir(parents=True)
            (folder / "train" / label / "1_1.txt").write_text("fine words", "utf-8")
        broken = folder / "train" / "pos" / "2_9.txt"
        broken.write_bytes(before.encode() + bad + b" and more")
    else:
        rows = [*ANCHORS]
        rows.insert(row, (f"{before}MARK", "pos"))
        broken = write_rows(folder / f"train.{fmt}", rows, fmt)
        broken.write_bytes(broken.read_bytes().replace(b"MARK", bad, 1))
    with pytest.raises(ValueError, match="not valid UTF-8") as error:
        TextDataModule(str(folder), cache_dir=str(folder / "cache"), test_split=None)._text_splits()
    message = str(error.value)
    assert str(broken) in message and "line " in message


@LOADER_SETTINGS
@given(
    fmt=st.sampled_from(["jsonl", "csv"]),
    rows=st.lists(st.tuples(st.text(min_size=1, max_size=20).filter(str.strip), LABELS), max_size=6),
    data=st.data(),
)
def test_a_missing_or_nan_label_is_an_error_naming_the_row(tmp_path_factory, fmt, rows, data):
    rows = ANCHORS + rows
    row = data.draw(st.integers(0, len(rows) - 1), label="row")
    missing = data.draw(st.sampled_from([None, float("nan")] if fmt == "jsonl" else [None]), label="missing")
    rows[row] = (rows[row][0], missing)
    folder = folder_with(tmp_path_factory, rows, fmt)
    with pytest.raises(ValueError, match=rf"row {row} of split 'train' \(.*train\.{fmt}\) has no label"):
        text_splits(folder, folder / "cache")


def test_huge_texts_load_whole(tmp_path_factory):
    huge = "word " * 300_000  # 1.5 MB in one field
    for fmt in ("jsonl", "csv"):
        folder = folder_with(tmp_path_factory, [*ANCHORS, (huge, "pos")], fmt)
        assert text_splits(folder, folder / "cache")["train"]["text"][-1] == huge


def test_a_split_of_only_blank_texts_is_an_error(tmp_path_factory):
    folder = folder_with(tmp_path_factory, [("", "pos"), ("  \n", "neg")], "jsonl")
    with pytest.raises(ValueError, match="split 'train' of .*train.jsonl has no rows with text"):
        text_splits(folder, folder / "cache")


def test_a_class_too_small_to_carve_validation_from_is_an_error_naming_the_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_rows(folder / "train.jsonl", [*ANCHORS, ("another good one", "pos"), ("lonely", "meh")], "jsonl")
    with pytest.raises(ValueError, match=r"class(es)? .*'meh'.* a single row .*in split 'train' \(.*train.jsonl\)"):
        TextDataModule(str(folder), cache_dir=str(folder / "cache"), test_split=None)._text_splits()


# --- the classify API and command ----------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    from gru_nlp import TextClassifier

    return TextClassifier.from_checkpoint(tiny_checkpoint, device="cpu")


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(st.one_of(st.text(max_size=60), st.just(""), st.just(" \n\t"), st.just("great " * 2000)), max_size=6))
def test_predict_answers_every_text_in_order(classifier, texts):
    predictions = classifier.predict(texts, batch_size=4)
    assert [p.text for p in predictions] == texts
    for prediction in predictions:
        assert prediction.label in classifier.labels
        assert abs(sum(prediction.probs.values()) - 1) < 1e-5
        assert 1 <= prediction.num_tokens <= classifier.max_length
        # Only plain spaces for sure: Python's strip() also drops control characters such as
        # "\x1f", which the tokenizer reads as an unknown token, so those are not empty.
        if not prediction.text.strip(" \t\n"):
            assert prediction.empty
    # Batched with other texts or alone, a text gets the same probabilities (up to float noise).
    for alone, batched in zip((classifier.predict(text) for text in texts), predictions):
        assert all(abs(alone.probs[name] - batched.probs[name]) < 1e-4 for name in classifier.labels)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=30), min_size=1, max_size=5))
def test_classify_reads_back_csv_and_jsonl_with_quotes_and_newlines(tmp_path_factory, texts):
    folder = tmp_path_factory.mktemp("input")
    for fmt in ("csv", "jsonl"):
        path = write_rows(folder / f"in.{fmt}", [(text, "x") for text in texts], fmt)
        assert list(read_texts(path)) == texts


def test_classify_reports_invalid_utf8_in_one_line(tmp_path, tiny_checkpoint, capsys):
    path = tmp_path / "in.txt"
    path.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(SystemExit) as failed:
        classify_main(["--ckpt", str(tiny_checkpoint), "--input", str(path), "--output", str(tmp_path / "out.jsonl")])
    assert failed.value.code == 2
    assert "utf-8" in capsys.readouterr().err.lower()
    assert not (tmp_path / "out.jsonl").exists()


def test_classify_names_the_file_with_invalid_utf8(tmp_path, tiny_checkpoint, capsys):
    path = tmp_path / "in.txt"
    path.write_bytes(b"bad \xff byte\n")
    with pytest.raises(SystemExit):
        classify_main(["--ckpt", str(tiny_checkpoint), "--input", str(path)])
    assert str(path) in capsys.readouterr().err


def test_classify_reads_a_huge_csv_field(tmp_path):
    huge = "word " * 30_000
    path = write_rows(tmp_path / "in.csv", [(huge, "x")], "csv")
    assert list(read_texts(path)) == [huge]
