import csv
import gzip
import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import datasets
import huggingface_hub.constants
import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from gru_nlp.carve import sentence_rows, tail_rows
from gru_nlp.data import DataError, TextDataModule
from gru_nlp.tokenizer import save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny"

ADJECTIVES = {
    "neg": ["dull", "awful", "boring", "clumsy", "lifeless"],
    "pos": ["superb", "moving", "funny", "charming", "warm"],
}


def reviews(label: str, count: int, start: int) -> list[dict]:
    words = ADJECTIVES[label]
    return [
        {"text": f"Review {start + i}: the film was {words[i % 5]}.<br />" + " really" * (i % 4), "label": label}
        for i in range(count)
    ]


# Negatives first, then positives, each in id order: the row order of an aclImdb folder.
TRAIN = reviews("neg", 10, 0) + reviews("pos", 10, 0)
TEST = reviews("neg", 3, 100) + reviews("pos", 3, 100)


def write(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format named by the file's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_acl_imdb(root: Path) -> Path:
    for split, rows in (("train", TRAIN), ("test", TEST)):
        for row in rows:
            number = int(row["text"].split(":")[0].split()[1])
            folder = root / "aclImdb" / split / row["label"]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{number}_{7 if row['label'] == 'pos' else 2}.txt").write_text(row["text"])
    (root / "aclImdb" / "train" / "unsup").mkdir()
    (root / "aclImdb" / "train" / "unsup" / "0_0.txt").write_text("An unlabelled review.")
    return root / "aclImdb"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    """One tokenizer for every source, so that their encodings can be compared."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    save_tokenizer(train_tokenizer([row["text"] for row in TRAIN], vocab_size=60, min_frequency=1), path)
    return str(path)


def data_module(path: Path | str, tmp_path: Path, **kwargs) -> TextDataModule:
    kwargs = {"batch_size": 4, "val_size": 0.1, "cache_dir": str(tmp_path / "cache")} | kwargs
    return TextDataModule(str(path), **kwargs)


def examples(loader) -> list[tuple]:
    """(index, ids, label) of every example a loader serves, in row order."""
    rows = []
    for batch in loader:
        columns = (batch["index"], batch["input_ids"], batch["lengths"], batch["labels"])
        for index, ids, length, label in zip(*columns, strict=True):
            rows.append((int(index), tuple(ids[:length].tolist()), int(label)))
    return sorted(rows)


def test_every_source_kind_loads_the_same_examples(tmp_path, tokenizer_path):
    unsup = [{"text": "An unlabelled review.", "label": -1}]
    sources = {"acl_imdb": write_acl_imdb(tmp_path / "imdb")}
    for kind in ("parquet", "csv", "json", "jsonl"):
        write(tmp_path / kind / f"train.{kind}", TRAIN)
        write(tmp_path / kind / f"test.{kind}", TEST)
        if kind != "csv":  # an unused split with labels the others lack must not matter
            write(tmp_path / kind / f"unsup.{kind}", unsup)
        sources[kind] = tmp_path / kind
    sources["single_file"] = write(tmp_path / "single.jsonl", TRAIN)

    loaded = {}
    for kind, path in sources.items():
        test_split = None if kind == "single_file" else "test"
        dm = data_module(path, tmp_path, tokenizer_path=tokenizer_path, test_split=test_split)
        assert dm.label_names == ["neg", "pos"], kind
        dm.setup("fit")
        loaded[kind] = (examples(dm.train_dataloader()), examples(dm.val_dataloader()))
        if test_split:
            dm.setup("test")
            loaded[kind] += (examples(dm.test_dataloader()),)
    reference = loaded["parquet"]
    assert [len(split) for split in reference] == [18, 2, 6]
    for kind, splits in loaded.items():
        assert splits == reference[: len(splits)], kind


def test_acl_imdb_unsup_folder_is_the_unsup_split_for_pretraining_only(tmp_path, tokenizer_path):
    from gru_nlp.data import load_texts

    root = write_acl_imdb(tmp_path / "imdb")
    cache_dir = str(tmp_path / "cache")
    assert load_texts(str(root), ["unsup"], cache_dir=cache_dir) == ["An unlabelled review."]
    assert len(load_texts(str(root.parent), ["train", "unsup"], cache_dir=cache_dir)) == len(TRAIN) + 1
    dm = data_module(root, tmp_path, tokenizer_path=tokenizer_path, test_split="test")
    dm.setup("fit")
    assert len(examples(dm.train_dataloader())) + len(examples(dm.val_dataloader())) == len(TRAIN)


def test_folder_split_names(tmp_path):
    write(tmp_path / "data" / "train.csv", TRAIN)
    write(tmp_path / "data" / "dev.csv", TEST)
    (tmp_path / "data" / "dataset_info.json").write_text("{}")  # another split, never read
    dm = data_module(tmp_path / "data", tmp_path, test_split=None)
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 20 and len(dm.val_dataloader().dataset) == 6
    with pytest.raises(
        ValueError, match=r"test_split='test' is not a split of .* \(it has dataset_info, train, validation\)"
    ):
        data_module(tmp_path / "data", tmp_path).num_classes
    write(tmp_path / "data" / "train.jsonl", TRAIN)
    with pytest.raises(ValueError, match="train.csv, .*train.jsonl mix csv and json files"):
        data_module(tmp_path / "data", tmp_path, test_split=None).num_classes


def test_each_split_is_read_on_its_own_terms(tmp_path):
    # Another format, an extra column and another column order than the training split's.
    write(tmp_path / "data" / "train.csv", [{"id": i} | row for i, row in enumerate(TRAIN)])
    write(tmp_path / "data" / "test.jsonl", [{"label": row["label"], "text": row["text"]} for row in TEST])
    dm = data_module(tmp_path / "data", tmp_path)
    dm.setup("test")
    assert [label for _, _, label in examples(dm.test_dataloader())] == [0, 0, 0, 1, 1, 1]


def test_tsv_files_are_tab_separated_without_quoting(tmp_path):
    (tmp_path / "data").mkdir()
    rows = ["sentence\tlabel"] + [f"{row['text']}\t{row['label']}" for row in TRAIN]
    rows[1] = '"the film was dull .\tneg'  # a lone quote, as GLUE's SST-2 has
    (tmp_path / "data" / "train.tsv").write_text("\n".join(rows) + "\n")
    dm = data_module(tmp_path / "data", tmp_path, text_field="sentence", test_split=None, val_size=2)
    dm.setup("fit")
    texts = [text for role in ("train", "val") for text in dm._text_splits()[role]["text"]]
    assert len(texts) == 20 and '"the film was dull .' in texts


def test_a_split_with_classlabel_names_of_its_own_is_matched_by_name(tmp_path):
    # What `class_encode_column` writes for a split that lists its classes in another order.
    def save(rows: list[dict], names: list[str], path: Path) -> None:
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
        rows = [{"text": row["text"], "label": names.index(row["label"])} for row in rows]
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))

    (tmp_path / "data").mkdir()
    save(TRAIN, ["neg", "pos"], tmp_path / "data" / "train.parquet")
    save(TEST, ["pos", "neg"], tmp_path / "data" / "test.parquet")
    dm = data_module(tmp_path / "data", tmp_path)
    dm.setup("test")
    assert dm.label_names == ["neg", "pos"]
    assert [label for _, _, label in examples(dm.test_dataloader())] == [0, 0, 0, 1, 1, 1]
    save(TEST + [{"text": "So-so.", "label": "mixed"}], ["mixed", "neg", "pos"], tmp_path / "data" / "test.parquet")
    with pytest.raises(ValueError, match=r"label 0 \('mixed'\) at row 6 of split 'test' .* not one of the classes \['neg', 'pos'\]"):
        data_module(tmp_path / "data", tmp_path).num_classes


def test_the_carved_validation_split_is_stratified_and_seeded(tmp_path):
    def val_examples(**kwargs) -> list[tuple]:
        dm = data_module(TINY, tmp_path, vocab_size=100, **kwargs)
        dm.setup("fit")
        assert len(dm.train_dataloader().dataset) == 108
        return [(ids, label) for _, ids, label in examples(dm.val_dataloader())]

    first = val_examples(seed=1)
    assert Counter(label for _, label in first) == {0: 6, 1: 6}
    assert val_examples(seed=1) == first
    assert sorted(val_examples(seed=2)) != sorted(first)


def test_a_tail_carve_validates_on_each_class_last_rows_whatever_the_seed(tmp_path, tokenizer_path):
    # IMDB's reviews of one movie have neighbouring ids: the last rows of each class
    # hold reviews of movies the training rows do not see, as in the test split.
    path = write(tmp_path / "data" / "train.parquet", TRAIN)

    def val_review_numbers(seed: int) -> list[tuple[int, int]]:
        dm = data_module(
            path, tmp_path, val_size=0.2, val_carve="tail", seed=seed, test_split=None, tokenizer_path=tokenizer_path
        )
        dm.setup("fit")
        assert len(dm.train_dataloader().dataset) == 16
        texts = [(dm.tokenizer.decode(list(ids)), label) for _, ids, label in examples(dm.val_dataloader())]
        return sorted((label, int(text.split()[1])) for text, label in texts)

    assert val_review_numbers(seed=1) == [(0, 8), (0, 9), (1, 8), (1, 9)]
    assert val_review_numbers(seed=2) == val_review_numbers(seed=1)


def test_a_tail_carve_shares_a_count_out_by_class_size():
    labels = [0, 1, 2, 0, 1, 0, 2, 0, 1, 0]  # 5, 3 and 2 rows
    train_rows, val_rows = tail_rows(labels, 5)  # shares 2.5, 1.5, 1: the tie goes to class 0
    assert val_rows == [5, 6, 7, 8, 9]
    assert train_rows == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="class 1 has 3 rows"):
        tail_rows(labels, 0.9)


def test_a_class_too_small_for_a_tail_carve_is_an_error_naming_the_file(tmp_path):
    path = write(tmp_path / "data" / "train.jsonl", TRAIN + [{"text": "A lone meh.", "label": "meh"}])
    with pytest.raises(ValueError, match=r"cannot carve a validation split .*train.jsonl: class 'meh' has 1 rows.* Set val_split"):
        data_module(path, tmp_path, val_size=0.2, val_carve="tail", test_split=None).num_classes
    with pytest.raises(ValueError, match="val_carve must be 'random', 'tail' or 'sentences'"):
        data_module(path, tmp_path, val_carve="last")


# SST-2's training split: each sentence, and labelled phrases cut from it.
PHRASES = [
    ("a warm , funny film", "pos"),
    ("warm , funny", "pos"),
    ("funny film", "pos"),
    ("the film", "neg"),  # inside sentences of both sides
    ("a dull , lifeless film", "neg"),
    ("dull ,  lifeless", "neg"),  # runs are compared word by word, whatever the spacing
    ("lifeless", "neg"),
    ("the film is clumsy", "neg"),
    ("is clumsy", "neg"),
    ("the film is superb", "pos"),
    ("superb", "pos"),
    ("the film is superb", "pos"),  # a duplicated sentence goes to one side with its copy
]


def inside(phrase: str, sentence: str) -> bool:
    """Whether `phrase` is a run of consecutive words of `sentence`."""
    words, sentence_words = phrase.split(), sentence.split()
    return any(sentence_words[i : i + len(words)] == words for i in range(len(sentence_words)))


def test_a_sentence_carve_keeps_the_phrases_of_validation_sentences_out_of_training():
    texts, labels = [text for text, _ in PHRASES], [int(label == "pos") for _, label in PHRASES]
    wholes = {0, 4, 7, 9, 11}
    seen_in_val = set()
    for seed in range(20):
        train_rows, val_rows = sentence_rows(texts, labels, val_size=0.4, seed=seed)
        assert set(val_rows) <= wholes  # only whole sentences validate, one per class (0.4 of 4)...
        assert sorted(labels[row] for row in val_rows if row != 11) == [0, 1]
        assert (9 in val_rows) == (11 in val_rows)  # ...with their duplicates
        train_wholes = wholes - set(val_rows)
        expected_train = [
            row
            for row in range(len(texts))
            if row in train_wholes
            or row not in wholes
            and (any(inside(texts[row], texts[w]) for w in train_wholes) or not any(inside(texts[row], texts[v]) for v in val_rows))
        ]
        assert train_rows == expected_train
        seen_in_val.update(val_rows)
    assert seen_in_val == wholes  # the seed decides which sentences validate
    # Seed 0 validates on "a dull , lifeless film" and both copies of "the film is superb".
    # "the film" stays, as it is also inside "the film is clumsy"; "dull , lifeless",
    # "lifeless" and "superb" leave training.
    assert sentence_rows(texts, labels, val_size=0.4, seed=0) == ([0, 1, 2, 3, 7, 8], [4, 9, 11])


def test_a_sentence_carve_refuses_long_texts(tmp_path, monkeypatch):
    monkeypatch.setattr("gru_nlp.carve.MAX_WORD_RUNS", 100)
    long_text = " ".join(["word"] * 20)  # 210 runs of words
    path = write(tmp_path / "data" / "train.jsonl", [{"text": long_text, "label": "pos"}] + TRAIN)
    with pytest.raises(ValueError, match=r"cannot carve .*train.jsonl.*compares every run of words.*'tail'\.$"):
        data_module(path, tmp_path, val_carve="sentences", test_split=None).num_classes  # no advice on val_size


def test_a_sentence_carve_through_the_data_module(tmp_path, tokenizer_path):
    rows = [{"text": text, "label": label} for text, label in PHRASES]
    path = write(tmp_path / "data" / "train.parquet", rows)
    dm = data_module(path, tmp_path, val_size=2, val_carve="sentences", test_split=None, tokenizer_path=tokenizer_path)
    dm.setup("fit")
    val_texts = [" ".join(text.split()) for text in dm._splits["val"]["text"]]
    train_texts = [" ".join(text.split()) for text in dm._splits["train"]["text"]]
    assert len(val_texts) in (2, 3)  # two sentences, one class each, and a duplicate if drawn
    assert Counter(dm._splits["val"]["labels"])[0] == 1
    assert not set(val_texts) & set(train_texts)


def test_label_names_reorder_or_rename_a_class_label_column(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = [{"text": row["text"], "label": int(row["label"] == "pos")} for row in TRAIN]
    path = tmp_path / "data" / "train.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))

    def labels_of(label_names: list[str]) -> tuple[list[str], list[tuple[str, int]]]:
        dm = data_module(path, tmp_path, label_names=label_names, test_split=None, val_size=0.2)
        train = dm._text_splits()["train"]
        return dm.label_names, sorted({(text.split(" was ")[1].split(".")[0], label) for text, label in zip(train["text"], train["labels"])})

    names, _ = labels_of(None)
    assert names == ["neg", "pos"]
    names, pairs = labels_of(["pos", "neg"])  # the same classes in another order: ids follow the names
    assert names == ["pos", "neg"]
    assert ("dull", 1) in pairs and ("superb", 0) in pairs
    names, pairs = labels_of(["bad", "good"])  # new names: renamed in id order
    assert names == ["bad", "good"] and ("dull", 0) in pairs
    with pytest.raises(ValueError, match=r"share some but not all of the class names \['neg', 'pos'\]"):
        labels_of(["neg", "good"])


def test_val_size_can_be_a_count(tmp_path):
    dm = data_module(TINY, tmp_path, val_size=10, vocab_size=100)
    dm.setup("validate")
    assert Counter(label for _, _, label in examples(dm.val_dataloader())) == {0: 5, 1: 5}


def test_properties_before_setup_and_lazy_construction(tmp_path):
    TextDataModule("/no/such/folder")  # cheap: reads nothing yet
    dm = data_module(TINY, tmp_path, vocab_size=100)
    assert (dm.num_classes, dm.label_names, dm.pad_id) == (2, ["neg", "pos"], 0)
    assert dm.vocab_size == dm.tokenizer.get_vocab_size() <= 100
    assert dm.tokenizer.token_to_id("[PAD]") == dm.pad_id


def test_the_trained_tokenizer_and_the_encoding_are_cached(tmp_path):
    first, second = (data_module(TINY, tmp_path, vocab_size=100) for _ in range(2))
    assert first.tokenizer.to_str() == second.tokenizer.to_str()
    (cached,) = (tmp_path / "cache" / "tokenizers").glob("*.json")
    assert cached.read_text() == first.tokenizer.to_str()
    data_module(TINY, tmp_path, vocab_size=90).tokenizer
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 2
    first.setup("fit")
    second.setup("fit")
    assert first.train_dataloader().dataset.cache_files == second.train_dataloader().dataset.cache_files


def test_batches_are_padded_only_to_their_longest_text(tmp_path):
    dm = data_module(TINY, tmp_path, vocab_size=100, batch_size=8, max_length=12, truncation="head")
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(batch["labels"]) for batch in batches) == 108
    for batch in batches:
        input_ids, lengths = batch["input_ids"], batch["lengths"]  # (B, T), (B,)
        assert input_ids.shape[1] == lengths.max() <= 12
        is_text = torch.arange(input_ids.shape[1]) < lengths[:, None]  # (B, T)
        assert (input_ids[~is_text] == 0).all() and (input_ids[is_text] != 0).all()
    val_batches = list(dm.val_dataloader())
    assert len(val_batches[0]["labels"]) == 12  # eval batches are twice as large: one batch of all 12


def test_rows_without_text_are_skipped_with_a_warning(tmp_path, caplog):
    rows = [dict(row) for row in TRAIN]
    rows[3]["text"] = "   "
    rows[7]["text"] = None
    rows[12]["text"] = ""
    write(tmp_path / "data" / "train.jsonl", rows)
    write(tmp_path / "data" / "test.jsonl", TEST[:2] + [{"text": "", "label": "neg"}] + TEST[2:])
    dm = data_module(tmp_path / "data", tmp_path)
    with caplog.at_level(logging.WARNING, logger="gru_nlp.data"):
        dm.setup("fit")
    messages = [record.getMessage() for record in caplog.records]
    assert any("Skipped 3 of 20 rows of split 'train'" in m and "first: row 3" in m for m in messages)
    assert any("Skipped 1 of 7 rows of split 'test'" in m and "first: row 2" in m for m in messages)
    assert len(dm.train_dataloader().dataset) + len(dm.val_dataloader().dataset) == 17
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 6


def test_integer_labels(tmp_path):
    def as_ints(rows: list[dict]) -> list[dict]:
        return [{"text": row["text"], "label": int(row["label"] == "pos")} for row in rows]

    write(tmp_path / "data" / "train.parquet", as_ints(TRAIN))
    write(tmp_path / "data" / "test.parquet", as_ints(TEST))
    assert data_module(tmp_path / "data", tmp_path).label_names == ["0", "1"]
    assert data_module(tmp_path / "data", tmp_path, label_names=["bad", "good", "meh"]).num_classes == 3
    write(tmp_path / "data" / "test.parquet", as_ints(TEST) + [{"text": "Meh.", "label": 2}])
    with pytest.raises(
        ValueError, match=r"label 2 at row 6 of split 'test' .* not one of the classes \['bad', 'good'\] \(label values \[0, 1\]\)"
    ):
        data_module(tmp_path / "data", tmp_path, label_names=["bad", "good"]).setup("test")


def test_integer_labels_named_by_their_values_keep_their_classes(tmp_path):
    # Star ratings or polarity labels 1 / 2, as in Yelp or Amazon: classes named "1" and "2", which a
    # checkpoint stores and the CLI hands back as label_names when testing it.
    def rated(rows: list[dict]) -> list[dict]:
        return [{"text": row["text"], "label": 2 if row["label"] == "pos" else 1} for row in rows]

    write(tmp_path / "data" / "train.jsonl", rated(TRAIN))
    write(tmp_path / "data" / "test.jsonl", rated(TEST))
    trained = data_module(tmp_path / "data", tmp_path)
    assert trained.label_names == ["1", "2"]
    for names, ids in ((["1", "2"], [0, 0, 0, 1, 1, 1]), (["2", "1"], [1, 1, 1, 0, 0, 0])):
        dm = data_module(tmp_path / "data", tmp_path, label_names=names)
        dm.setup("test")
        assert dm.label_names == names
        assert [label for _, _, label in examples(dm.test_dataloader())] == ids


def test_labels_written_as_another_type_in_another_split_are_matched_by_their_text(tmp_path):
    def rated(rows: list[dict], kind: type) -> list[dict]:
        return [{"text": row["text"], "label": kind(2 if row["label"] == "pos" else 1)} for row in rows]

    write(tmp_path / "data" / "train.jsonl", rated(TRAIN, str))  # "1" / "2"
    write(tmp_path / "data" / "test.csv", rated(TEST, int))  # read back as the integers 1 / 2
    dm = data_module(tmp_path / "data", tmp_path)
    dm.setup("test")
    assert dm.label_names == ["1", "2"]
    assert [label for _, _, label in examples(dm.test_dataloader())] == [0, 0, 0, 1, 1, 1]


def test_a_label_that_is_a_json_list_is_an_error_naming_it(tmp_path):
    write(tmp_path / "data" / "train.jsonl", TRAIN)
    write(tmp_path / "data" / "test.jsonl", TEST[:3] + [dict(TEST[3], label=["pos"])])
    with pytest.raises(DataError, match=r"label \['pos'\] at row 3 of split 'test' .* is not one of the classes \['neg', 'pos'\]"):
        data_module(tmp_path / "data", tmp_path).num_classes


def test_label_names_that_repeat_a_class_are_an_error(tmp_path):
    with pytest.raises(DataError, match=r"label_names \['pos', 'neg', 'pos'\] name a class twice: 'pos'"):
        data_module(TINY, tmp_path, label_names=["pos", "neg", "pos"])


@pytest.mark.parametrize(
    "raised, expected",
    [
        (datasets.exceptions.DatasetNotFoundError("Dataset 'nobody/imdbb' doesn't exist on the Hub"), FileNotFoundError),
        (ValueError("BuilderConfig 'sst3' not found. Available: ['sst2']"), DataError),
    ],
)
def test_hub_loading_errors_name_the_dataset(tmp_path, monkeypatch, raised, expected):
    def load_dataset(*args, **kwargs):
        raise raised

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(expected, match=f"'nobody/imdbb'.*{re.escape(str(raised))}") as error:
        data_module("nobody/imdbb", tmp_path).num_classes
    assert isinstance(error.value, DataError) and error.value.__cause__ is None


def test_string_labels_follow_label_names(tmp_path):
    write(tmp_path / "data" / "train.csv", TRAIN)
    write(tmp_path / "data" / "test.csv", TEST)
    dm = data_module(tmp_path / "data", tmp_path, label_names=["pos", "neg"])
    dm.setup("test")
    assert dm.label_names == ["pos", "neg"]
    assert [label for _, _, label in examples(dm.test_dataloader())] == [1, 1, 1, 0, 0, 0]


def test_an_unknown_test_label_is_an_error(tmp_path):
    write(tmp_path / "data" / "train.jsonl", TRAIN)
    write(tmp_path / "data" / "test.jsonl", TEST + [{"text": "So-so.", "label": "mixed"}])
    with pytest.raises(ValueError, match=r"label 'mixed' at row 6 of split 'test' \(.*test.jsonl\) is not one of"):
        data_module(tmp_path / "data", tmp_path).num_classes


@pytest.mark.parametrize("missing", [None, math.nan])
def test_a_missing_label_is_an_error(tmp_path, missing):
    rows = [dict(row, label=float(row["label"] == "pos")) for row in TRAIN]
    rows[5]["label"] = missing
    write(tmp_path / "train.parquet", rows)
    with pytest.raises(ValueError, match=r"row 5 of split 'train' \(.*train.parquet\) has no label"):
        data_module(tmp_path / "train.parquet", tmp_path, test_split=None).num_classes


def test_a_missing_column_is_an_error(tmp_path):
    write(tmp_path / "reviews.csv", [{"review": row["text"], "label": row["label"]} for row in TRAIN])
    with pytest.raises(
        ValueError, match=r"column 'text' not found in split 'train' of .*reviews.csv.*'review', 'label'"
    ):
        data_module(tmp_path / "reviews.csv", tmp_path, test_split=None).num_classes
    assert data_module(tmp_path / "reviews.csv", tmp_path, test_split=None, text_field="review").num_classes == 2


def test_a_json_column_of_mixed_types_is_read_as_its_values(tmp_path, caplog):
    """`datasets` stores such a column as JSON text: texts would gain quotes, labels a class '"neg"'."""
    rows = [dict(row) for row in TRAIN]
    rows[3]["text"] = ["a", "list"]
    write(tmp_path / "train.jsonl", rows)
    dm = data_module(tmp_path / "train.jsonl", tmp_path, test_split=None, val_size=2)
    texts = [row["text"] for name in ("train", "val") for row in dm._text_splits()[name]]
    assert sorted(texts) == sorted(row["text"] for row in TRAIN if row is not TRAIN[3])  # no quotes added
    assert "Skipped 1 of 20 rows" in caplog.text
    assert dm.label_names == ["neg", "pos"]

    rows[3] = dict(TRAIN[3], label=1)
    write(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"labels of split 'train' \(.*train.jsonl\) must be all integers or all strings"):
        data_module(tmp_path / "train.jsonl", tmp_path, test_split=None).num_classes


def test_a_text_column_of_numbers_is_an_error(tmp_path):
    write(tmp_path / "train.jsonl", [dict(row, text=i) for i, row in enumerate(TRAIN)])
    with pytest.raises(DataError, match=r"column 'text' of split 'train' \(.*\) holds int64 values, not text"):
        data_module(tmp_path / "train.jsonl", tmp_path, test_split=None).num_classes


def test_missing_files_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        data_module(tmp_path / "nothing", tmp_path).num_classes
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        data_module("reviews.csv", tmp_path).num_classes
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.parquet, \.csv, \.tsv, \.json, \.jsonl files \(or .*compressed .*\) in .*empty_folder"):
        data_module(tmp_path / "empty_folder", tmp_path).num_classes


def test_empty_data_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        data_module(tmp_path / "empty.jsonl", tmp_path, test_split=None).num_classes
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="could not read .*header.csv as csv: it has no rows$"):
        data_module(tmp_path / "header.csv", tmp_path, test_split=None).num_classes
    (tmp_path / "semicolons.csv").write_text("text;label\ngood;pos\nbad; a film, dull;neg\n")
    with pytest.raises(ValueError, match=r"semicolons.csv as csv: Error tokenizing data.* \(is it comma-separated\?"):
        data_module(tmp_path / "semicolons.csv", tmp_path, test_split=None).num_classes
    write(tmp_path / "blank.jsonl", [{"text": " ", "label": "pos"}])
    with pytest.raises(ValueError, match="split 'train' of .*blank.jsonl has no rows with text"):
        data_module(tmp_path / "blank.jsonl", tmp_path, test_split=None).num_classes
    for name, columns in (
        ("lists.json", {"text": ["good", "bad"], "label": ["pos", "neg"]}),  # pandas to_dict("list")
        ("index.json", {"text": {"0": "good", "1": "bad"}, "label": {"0": "pos", "1": "neg"}}),  # pandas to_json()
    ):
        (tmp_path / name).write_text(json.dumps(columns))
        with pytest.raises(ValueError, match=rf"{name} holds one object of columns .* write a list of records"):
            data_module(tmp_path / name, tmp_path, test_split=None).num_classes


def test_an_unreachable_hub_says_so_and_suggests_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ConnectionError, match="Could not reach the Hugging Face Hub to load 'nobody/no-such-data'.*local"
    ):
        data_module("nobody/no-such-data", tmp_path).num_classes


class Recorder(L.LightningModule):
    """A tiny model that records which examples it saw."""

    def __init__(self, vocab_size: int, num_classes: int, label_names: list[str]) -> None:
        super().__init__()
        self.save_hyperparameters()  # as LitClassifier does: Lightning merges these with the data's
        self.embedding = nn.EmbeddingBag(vocab_size, 3)
        self.classifier = nn.Linear(3, num_classes)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["index"].tolist()))
        logits = self.classifier(self.embedding(batch["input_ids"]))  # (B, K)
        return nn.functional.cross_entropy(logits, batch["labels"])

    def predict_step(self, batch, batch_idx):
        return batch["index"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_reshuffles_each_epoch_and_predicts_every_row(tmp_path):
    dm = data_module(TINY, tmp_path, vocab_size=1000, batch_size=16)
    model = Recorder(dm.vocab_size, dm.num_classes, dm.label_names)
    assert dm.vocab_size < 1000
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=CSVLogger(tmp_path),  # logging hparams fails if the data's and the model's disagree
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, dm)
    epochs = [[index for epoch, batch in model.seen if epoch == e for index in batch] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(108))  # 120 rows less 12 for validation
    assert epochs[0] != epochs[1]
    predicted = torch.cat(trainer.predict(model, dm))
    assert sorted(predicted.tolist()) == list(range(40))


DDP_SCRIPT = """
import json, sys
import lightning as L
from gru_nlp.data import TextDataModule
from tests.test_data import Recorder

dm = TextDataModule(sys.argv[1], batch_size=8, pool_size=2, vocab_size=100, cache_dir=sys.argv[2])
model = Recorder(dm.vocab_size, dm.num_classes, dm.label_names)
trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
trainer.fit(model, dm)
with open(f"{sys.argv[2]}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"seen": model.seen, "tokenizer": dm.tokenizer.to_str()}, f)
"""


@pytest.mark.slow
def test_ddp_ranks_share_the_tokenizer_and_split_the_batches(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    subprocess.run(
        [sys.executable, str(script), str(TINY), str(tmp_path)],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        check=True,
        timeout=300,
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["tokenizer"] == ranks[1]["tokenizer"]
    batches = [[[b for e, b in rank["seen"] if e == epoch] for epoch in range(2)] for rank in ranks]  # rank, epoch
    for epoch in range(2):
        assert len(batches[0][epoch]) == len(batches[1][epoch])
        seen = [[i for batch in rank[epoch] for i in batch] for rank in batches]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(108))
    assert batches[0][0] != batches[0][1]  # set_epoch reached the sampler


def test_each_acl_imdb_class_folder_is_a_class_and_a_test_folder_training_lacks_is_an_error(tmp_path, tokenizer_path):
    root = write_acl_imdb(tmp_path / "imdb")
    for split, count in (("train", 4), ("test", 2)):
        (root / split / "mixed").mkdir()
        for i in range(count):
            (root / split / "mixed" / f"{i}_5.txt").write_text(f"Review {i}: the film was so-so.")
    dm = data_module(root, tmp_path, tokenizer_path=tokenizer_path, test_split="test", val_size=3)
    assert dm.label_names == ["mixed", "neg", "pos"]
    dm.setup("test")
    assert Counter(label for _, _, label in examples(dm.test_dataloader())) == {0: 2, 1: 3, 2: 3}
    (root / "test" / "great").mkdir()
    with pytest.raises(DataError, match=r"test has review folders \['great'\] that .*train does not have"):
        data_module(root, tmp_path, tokenizer_path=tokenizer_path, test_split="test").num_classes


def test_an_acl_imdb_test_folder_without_one_class_holds_the_others(tmp_path, tokenizer_path):
    root = write_acl_imdb(tmp_path / "imdb")
    for review in (root / "test" / "neg").iterdir():
        review.unlink()
    (root / "test" / "neg").rmdir()
    dm = data_module(root, tmp_path, tokenizer_path=tokenizer_path, test_split="test")
    dm.setup("test")
    assert [label for _, _, label in examples(dm.test_dataloader())] == [1, 1, 1]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"val_split": "train"}, "val_split='train' is also the train_split: it would score the rows the model trains on"),
        ({"test_split": "train"}, "test_split='train' is also the train_split"),
        ({"text_field": "label"}, "text_field and label_field are both 'label'"),
    ],
)
def test_settings_that_would_score_training_rows_or_learn_the_text_are_errors(tmp_path, settings, message):
    with pytest.raises(DataError, match=re.escape(message)):
        data_module(TINY, tmp_path, **settings).num_classes


def test_predicting_the_training_split_is_allowed(tmp_path, tokenizer_path):
    dm = data_module(TINY, tmp_path, tokenizer_path=tokenizer_path, label_names=["neg", "pos"], test_split="train")
    dm.setup("predict")
    assert len(dm.predict_texts()[1]) == 120  # every training text


def test_a_carve_that_takes_every_row_of_a_class_is_an_error_naming_it(tmp_path):
    rows = TRAIN + [{"text": "So-so, the film was.", "label": "mixed"}, {"text": "Mixed feelings.", "label": "mixed"}]
    write(tmp_path / "data" / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"val_size=0.8 carves every row of class 'mixed' .* leaving training none"):
        data_module(tmp_path / "data", tmp_path, test_split=None, val_size=0.8).setup("fit")


def test_boolean_labels_are_named_false_and_true_and_matched_by_those_names(tmp_path, tokenizer_path):
    for name, rows in (("train", TRAIN), ("dev", TEST)):
        write(tmp_path / "data" / f"{name}.jsonl", [{"text": row["text"], "label": row["label"] == "pos"} for row in rows])

    def val_labels(**kwargs) -> tuple[list[str], list[int]]:
        dm = data_module(tmp_path / "data", tmp_path, tokenizer_path=tokenizer_path, test_split=None, **kwargs)
        dm.setup("fit")
        return dm.label_names, [label for _, _, label in examples(dm.val_dataloader())]

    assert val_labels() == (["False", "True"], [0, 0, 0, 1, 1, 1])
    assert val_labels(label_names=["True", "False"]) == (["True", "False"], [1, 1, 1, 0, 0, 0])
    assert val_labels(label_names=["neg", "pos"]) == (["neg", "pos"], [0, 0, 0, 1, 1, 1])  # False and True: ids 0 and 1


def test_one_line_says_what_was_read_classes_label_values_and_rows_per_class(tmp_path, tokenizer_path, caplog):
    for name, rows in (("train", TRAIN), ("test", TEST[:4])):
        write(tmp_path / "data" / f"{name}.parquet", [{"text": row["text"], "label": int(row["label"] == "pos")} for row in rows])
    with caplog.at_level(logging.INFO):
        dm = data_module(tmp_path / "data", tmp_path, tokenizer_path=tokenizer_path, label_names=["neg", "pos"], val_size=4)
        dm.setup("fit")
    summaries = [record.getMessage() for record in caplog.records if record.getMessage().startswith("data: ")]
    assert summaries == [
        "data: classes ['neg', 'pos'] (label 0 is 'neg', 1 is 'pos'); train 16 rows (8 / 8); "
        "val (carved from train, random) 4 rows (2 / 2); test 4 rows (3 / 1)"
    ]


def test_labels_that_differ_only_in_case_or_spaces_are_warned_of(tmp_path, caplog):
    rows = TRAIN + [{"text": "Superb, the film.", "label": "Pos"}, {"text": "A moving film.", "label": "pos "}] * 2
    write(tmp_path / "data" / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        assert data_module(tmp_path / "data", tmp_path, test_split=None, val_size=6).label_names == ["Pos", "neg", "pos", "pos "]
    assert "labels 'Pos', 'pos', 'pos ' of split 'train'" in caplog.text and "are 3 classes" in caplog.text


def test_the_line_on_what_was_read_counts_the_texts_that_are_also_in_training(tmp_path, tokenizer_path, caplog):
    write(tmp_path / "data" / "train.jsonl", TRAIN)
    write(tmp_path / "data" / "test.jsonl", TEST + TRAIN[:2])
    with caplog.at_level(logging.INFO):
        data_module(tmp_path / "data", tmp_path, tokenizer_path=tokenizer_path, val_carve="tail", val_size=2).setup("fit")
    assert "test 8 rows (5 / 3; 2 of its texts also in train)" in caplog.text


def test_string_labels_of_a_split_match_the_names_of_a_training_classlabel(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = [{"text": row["text"], "label": ["neg", "pos"].index(row["label"])} for row in TRAIN]
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "data" / "train.parquet"))
    write(tmp_path / "data" / "test.csv", TEST)  # labels written as the names
    dm = data_module(tmp_path / "data", tmp_path)
    dm.setup("test")
    assert [label for _, _, label in examples(dm.test_dataloader())] == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("stage, encoded", [("validate", {"val"}), ("test", {"test"}), ("fit", {"train", "val", "test"})])
def test_prepare_data_encodes_the_splits_its_stage_uses(tmp_path, tokenizer_path, stage, encoded):
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    dm = data_module(TINY, tmp_path, tokenizer_path=tokenizer_path)
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn(stage)))
    dm.prepare_data()
    assert set(dm._encoded) == encoded


def test_a_hidden_folder_in_an_acl_imdb_split_is_no_class(tmp_path, tokenizer_path):
    root = write_acl_imdb(tmp_path / "imdb")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    for i in range(3):  # a notebook's leftovers would be a class, and shift the ids of neg and pos
        (root / "train" / ".ipynb_checkpoints" / f"{i}_7-checkpoint.txt").write_text("A copy of a review.")
    assert data_module(root, tmp_path, tokenizer_path=tokenizer_path, test_split="test").label_names == ["neg", "pos"]


@pytest.mark.parametrize("blank", ["", "  "])
@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_a_blank_label_is_missing_in_every_format(tmp_path, blank, kind):
    rows = [dict(row) for row in TRAIN]
    rows[4]["label"] = blank
    write(tmp_path / f"train.{kind}", rows)
    with pytest.raises(DataError, match=rf"row 4 of split 'train' \(.*train.{kind}\) has no label"):
        data_module(tmp_path / f"train.{kind}", tmp_path, test_split=None).num_classes


def test_a_test_split_without_labels_is_left_out_of_a_fit_and_named_when_tested(tmp_path, tokenizer_path, caplog):
    write(tmp_path / "data" / "train.jsonl", TRAIN)
    write(tmp_path / "data" / "test.jsonl", [{"id": i, "text": row["text"]} for i, row in enumerate(TEST)])  # Kaggle style
    dm = data_module(tmp_path / "data", tmp_path, tokenizer_path=tokenizer_path)
    with caplog.at_level(logging.WARNING, logger="gru_nlp.data"):
        dm.setup("fit")
    assert len(examples(dm.train_dataloader())) == 18
    assert "Not reading the test split: split 'test' (" in caplog.text
    with pytest.raises(DataError, match=r"split 'test' .* has no 'label' column .* `gru-nlp predict` labels it"):
        dm.setup("test")
    dm.setup("predict")
    assert len(dm.predict_texts()[1]) == 6


def test_compressed_text_files_a_hub_data_folder_and_a_saved_dataset_load_as_the_plain_files_do(tmp_path, tokenizer_path):
    write(tmp_path / "plain" / "train.jsonl", TRAIN)
    write(tmp_path / "plain" / "test.csv", TEST)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "train.jsonl.gz").write_bytes(gzip.compress((tmp_path / "plain" / "train.jsonl").read_bytes()))
    (tmp_path / "gz" / "test.csv.gz").write_bytes(gzip.compress((tmp_path / "plain" / "test.csv").read_bytes()))
    write(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet", TRAIN[:7])  # as a Hub dataset's files lie
    write(tmp_path / "hub" / "data" / "train-00001-of-00002-5e0ae7b4a2c1a0d9.parquet", TRAIN[7:])  # older uploads' names
    write(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", TEST)
    (tmp_path / "hub" / "README.md").write_text("# a dataset card")
    saved = datasets.DatasetDict(
        {split: datasets.Dataset.from_list(rows) for split, rows in (("train", TRAIN), ("test", TEST))}
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    loaded = {}
    for kind in ("plain", "gz", "hub", "saved"):
        dm = data_module(tmp_path / kind, tmp_path, tokenizer_path=tokenizer_path)
        dm.setup("fit")
        dm.setup("test")
        loaded[kind] = [examples(loader) for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())]
    assert [len(rows) for rows in loaded["plain"]] == [18, 2, 6]
    for kind in ("gz", "hub", "saved"):
        assert loaded[kind] == loaded["plain"], kind
    assert not list((tmp_path / "saved").rglob("cache-*"))  # encoding wrote nothing into the saved folder
    (tmp_path / "plain" / "state.json").write_text('{"epoch": 3}')  # a file of the user's, not a saved dataset
    assert data_module(tmp_path / "plain", tmp_path, tokenizer_path=tokenizer_path).num_classes == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"could not decompress .*train.jsonl.gz"):
        data_module(tmp_path / "bad", tmp_path, test_split=None).num_classes


@pytest.mark.parametrize(
    "rows, val_size, message",
    [
        (TRAIN + [{"text": "So-so.", "label": "mixed"}], 0.1, r"class 'mixed' has a single row in split 'train'"),
        (TRAIN, 1, r"val_size=1 carves 1 of the 20 rows .* leaving validation fewer rows than the 2 classes.* from 2 to 18"),
        (TRAIN, 19, r"val_size=19 carves 19 of the 20 rows .* leaving training fewer rows than the 2 classes"),
    ],
)
def test_a_random_carve_that_cannot_keep_every_class_on_both_sides_says_so_in_its_own_words(tmp_path, rows, val_size, message):
    write(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=message):
        data_module(tmp_path / "train.jsonl", tmp_path, test_split=None, val_size=val_size).num_classes


def test_a_class_named_by_label_names_without_training_rows_is_warned_of(tmp_path, caplog):
    write(tmp_path / "train.jsonl", TRAIN)
    with caplog.at_level(logging.WARNING, logger="gru_nlp.data"):
        dm = data_module(tmp_path / "train.jsonl", tmp_path, test_split=None, label_names=["neg", "pos", "mixed"])
        dm.setup("fit")
    assert dm.num_classes == 3
    assert "Classes ['mixed'] have no rows in split 'train'" in caplog.text
