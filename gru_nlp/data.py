"""Load a labelled text dataset, tokenize it, and serve length-bucketed batches.

`TextDataModule` reads a Hugging Face Hub dataset, a local folder or file of
parquet/csv/tsv/json(l) data, or the original `aclImdb/` folder (`gru_nlp.sources`);
turns labels into class ids; carves a stratified validation split when there is
none (`gru_nlp.carve`); trains (or loads) the tokenizer on the training split only;
and encodes every split once, in the `datasets` cache, so later runs start quickly.
"""

import hashlib
import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import lightning as L
from datasets import ClassLabel, Dataset, Features, Value
from filelock import FileLock  # a dependency of torch and datasets
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from gru_nlp.batching import BucketBatchSampler, collate
from gru_nlp.carve import VAL_CARVES, ValCarve, sentence_rows, tail_rows
from gru_nlp.labels import integer_label_ids
from gru_nlp.sources import DataError, DataNotFoundError, load_raw_splits
from gru_nlp.tokenizer import (
    PAD_ID,
    SPECIAL_TOKENS,
    TokenizerModel,
    Truncation,
    encode,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/gru_nlp"

# Bump when the tokenizer recipe in gru_nlp.tokenizer changes, so cached tokenizers are retrained.
_TOKENIZER_CACHE_VERSION = 2
# Which splits each Lightning stage encodes; "predict" serves the test split, else validation.
_STAGE_ROLES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class TextDataModule(L.LightningDataModule):
    """Text classification data: sources, labels, tokenizer and bucketed batches.

    Sources, all given by `path`:

    - a Hub dataset id (`"stanfordnlp/imdb"`, or `"glue"` with `name="sst2"`);
    - a local folder of `.parquet`, `.csv`, `.tsv` (tab-separated, no quoting), `.json`
      or `.jsonl` files (the text ones may be compressed: `train.jsonl.gz`, `.bz2`, `.xz`),
      the file stem naming the split (`train`, `test`; `validation`, `valid`, `val` or
      `dev` become `validation`; other stems such as `unsup` are their own split and are
      read only if named; shards such as `train-00000-of-00002.parquet` join their split);
      each split is read on its own (its format, columns and `ClassLabel` names); a folder
      with no data files but a `data/` folder of them (a Hub dataset's files) reads that;
    - a folder written by `datasets`' `save_to_disk` (a `Dataset` is the `train` split);
    - a single local data file, which becomes the `train` split;
    - the original IMDB folder, `aclImdb/{train,test}/{pos,neg}/*.txt`, with
      labels `neg`=0 and `pos`=1; another class folder beside them is another
      class, in sorted order (`train/unsup/` is the split `unsup`, read only if
      named, as `load_texts` does for pretraining; hidden folders such as
      `.ipynb_checkpoints` are no class).

    Rows: a row whose text is missing, not a string, or empty after stripping is
    skipped, and a warning gives how many were skipped per split and the first
    row index. A row with a missing (None, NaN or blank) label is an error, as is a
    validation or test label that the training split does not have. A test split
    without a label column is not read by `fit` (with a warning): it cannot be
    scored, and `gru-nlp predict` labels it. In a CSV
    file only an empty field is missing ("NA", "null" and "nan" are text). A
    csv/tsv/json(l)/txt file that is not UTF-8 is an error naming its line. Duplicated
    rows are kept.

    Labels: a `ClassLabel` column keeps its names (`label_names` with the same
    names puts them in its order; with none of them, renames the ids in order);
    integer labels are ids into `label_names` when given (unless every value is
    itself one of the names, as in `["1", "2"]` for labels 1 and 2: then each
    value takes its name's id), else the sorted distinct values become the
    classes, named by their values (booleans: `"False"` and `"True"`, matched
    by those names in `label_names`, else ids 0 and 1); string labels become ids in the order of
    `label_names` when given, else in sorted order.

    Validation: `val_split` when given; else the source's `validation` split
    (unless it is the test split); else `val_size` of the training split, carved
    off per class in proportion to its share, by `val_carve`: `"random"` rows
    (seeded), or the `"tail"`, each class's last rows in the split's order. Use
    `"tail"` when neighbouring rows belong together and the test split does not
    share their groups: in IMDB, reviews of one movie have neighbouring file ids
    and the test set's movies are not in train, so a random carve puts reviews of
    training movies in validation and rewards memorising names and titles. Use
    `"sentences"` for phrase-level data, whose training split holds each sentence
    and its labelled sub-phrases (SST-2): whole texts, ones no longer text contains,
    are drawn at random (seeded, per class) to validate, and training drops the
    phrases that occur only inside them, so validation sentences are unseen in every
    part; there `val_size` counts whole texts.

    The properties `tokenizer`, `vocab_size`, `num_classes`, `label_names` and
    `pad_id` work right after construction (LightningCLI links them into the
    model): the first access loads the data and trains or loads the tokenizer,
    once. A trained tokenizer is cached on disk, keyed by the training split's
    fingerprint and the tokenizer settings, so another run, or another process
    of a DDP run, gets the identical tokenizer. Note that the `vocab_size` and
    `label_names` arguments are requests; the properties of the same names give
    what the data and tokenizer turned out to have.

    Args:
        path: A Hub dataset id, or a local folder or file (see above).
        name: The Hub dataset's configuration, e.g. `"sst2"` for `"glue"`.
        text_field: The column holding the text.
        label_field: The column holding the label.
        label_names: The class names, in id order (see Labels above).
        train_split: The split to train on.
        val_split: The split to validate on; None picks one (see Validation above).
        test_split: The split to test and predict on, or None for none (`predict` then reads
            the validation split: `val_split`, else the source's, else the carve).
        val_size: The part of the training split carved off for validation when
            there is no validation split: a fraction below 1, or a count.
        val_carve: Which rows `val_size` carves off: `"random"`, `"tail"` or
            `"sentences"` (see Validation above).
        seed: Seeds the validation carve and the training batch order.
        tokenizer_path: A saved `tokenizer.json` to use instead of training one.
        vocab_size: The size of the tokenizer to train: the most tokens it learns, beyond
            the alphabet, which WordPiece and BPE keep whole (so a tiny vocab_size is exceeded).
        tokenizer_model: The subword model to train, `"wordpiece"` or `"bpe"`.
        lowercase: Whether the trained tokenizer lowercases.
        min_frequency: How often a pair must occur to become a token.
        max_length: The most tokens kept per text.
        truncation: Which tokens a longer text keeps: `"head"`, or `"head_tail"`
            (the first quarter and the last three quarters of `max_length`).
        batch_size: Training examples per batch.
        eval_batch_size: Examples per evaluation batch; defaults to `2 * batch_size`.
        pool_size: How many batches' worth of examples are sorted by length
            together; larger pools mean less padding but less shuffling.
        num_workers: DataLoader worker processes.
        cache_dir: Where `datasets` and the tokenizer cache live; defaults to
            the `datasets` default and `~/.cache/gru_nlp`.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        text_field: str = "text",
        label_field: str = "label",
        label_names: list[str] | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = "test",
        val_size: float = 0.1,
        val_carve: ValCarve = "random",
        seed: int = 42,
        tokenizer_path: str | None = None,
        vocab_size: int = 30000,
        tokenizer_model: TokenizerModel = "wordpiece",
        lowercase: bool = True,
        min_frequency: int = 2,
        max_length: int = 512,
        truncation: Truncation = "head_tail",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        pool_size: int = 50,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        for arg, value in (("val_size", val_size), ("max_length", max_length), ("batch_size", batch_size), ("pool_size", pool_size)):
            if value <= 0:
                raise DataError(f"{arg} must be positive, got {value}")
        if vocab_size < len(SPECIAL_TOKENS):
            raise DataError(f"vocab_size must be at least {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}")
        if eval_batch_size is not None and eval_batch_size <= 0:
            raise DataError(f"eval_batch_size must be positive, got {eval_batch_size}")
        if val_size >= 1 and not float(val_size).is_integer():
            raise DataError(f"val_size must be a fraction below 1 or a whole count, got {val_size}")
        if not str(path).strip():
            raise DataError("data.path is empty: name a Hub dataset or a local folder or file")
        if not 0 <= seed < 2**32:
            raise DataError(f"seed must be from 0 to 2**32 - 1, got {seed}")
        if val_carve not in VAL_CARVES:
            raise DataError(f"val_carve must be 'random', 'tail' or 'sentences', got {val_carve!r}")
        if text_field == label_field:
            raise DataError(f"text_field and label_field are both {text_field!r}: the labels would be the texts")
        if val_split is not None and val_split == train_split:
            raise DataError(f"val_split={val_split!r} is also the train_split: it would score the rows the model trains on")
        if cache_dir is not None:
            tokenizer_cache_folder(cache_dir)  # before minutes of loading, not after
        if label_names is not None and len(set(label_names)) < len(label_names):
            repeated = sorted({name for name in label_names if list(label_names).count(name) > 1})
            raise DataError(f"label_names {list(label_names)} name a class twice: {', '.join(map(repr, repeated))}")
        # The properties vocab_size and label_names give what the data turned out to
        # have, and LightningCLI links them into the model's hparams; Lightning refuses to
        # log one key with two values, so the requests stay out of this module's hparams.
        self.save_hyperparameters(ignore=["vocab_size", "label_names"])
        self._max_vocab_size = vocab_size
        self._requested_label_names = label_names
        self._splits: dict[str, Dataset] | None = None  # role -> columns text, labels, source_row
        self._unlabelled_test: str | None = None  # why the test split was not read, if it has no labels
        self._predict_split: Dataset | None = None  # columns text, source_row
        self._label_names: list[str] = []
        self._integer_label_ids: dict[int, int] = {}  # how the training split's integer labels became class ids
        # Set for a checkpoint being scored or resumed: how its training read integer labels ({value: class id},
        # empty if it read names). None: integer labels with label_names given are class ids 0..K-1.
        self.trained_integer_labels: dict[int, int] | None = None
        self._tokenizer: Tokenizer | None = None
        self._encoded: dict[str, Dataset] = {}  # role -> columns labels, input_ids, length, index

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer: loaded from `tokenizer_path`, or trained on the training split."""
        if self._tokenizer is None:
            if self.hparams.tokenizer_path is not None:
                try:
                    self._tokenizer = load_tokenizer(self.hparams.tokenizer_path)
                except FileNotFoundError as err:
                    raise DataNotFoundError(f"tokenizer_path: {err}") from None
                except ValueError as err:
                    raise DataError(f"tokenizer_path: {err}") from None
            else:
                self._tokenizer = self._cached_trained_tokenizer(self._text_splits()["train"])
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The number of token ids the tokenizer can produce."""
        return self.tokenizer.get_vocab_size()

    @property
    def label_names(self) -> list[str]:
        """The class names, in class id order: the `label_names` asked for, else read from the data."""
        if self._requested_label_names is not None and self._splits is None:
            return list(self._requested_label_names)  # what reading the labels would give, or an error
        self._text_splits()
        return list(self._label_names)

    @property
    def integer_label_ids(self) -> dict[int, int]:
        """How the training split's integer labels (or `ClassLabel` ids) became class ids; empty when its
        labels are names. Checkpoints keep it, so that scoring reads integer labels as training did."""
        self._text_splits()
        return dict(self._integer_label_ids)

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return len(self.label_names)

    @property
    def pad_id(self) -> int:
        """The padding token id, 0."""
        return PAD_ID

    def prepare_data(self) -> None:
        """Encode the splits, in one process, so that `setup` on each rank reads the cache: the
        split that `validate`, `test` or `predict` scores, else every configured split."""
        stage = self.trainer.state.fn if self.trainer is not None else None
        roles = _STAGE_ROLES[stage.value] if stage is not None and stage.value != "fit" else self._text_splits()
        for role in roles:
            self._encoded_split(role)

    def setup(self, stage: str) -> None:
        """Encode the splits that `stage` needs (cached: fast after the first run)."""
        for role in _STAGE_ROLES[stage]:
            self._encoded_split(role)

    def train_dataloader(self) -> DataLoader:
        return self._dataloader("train", shuffle=True, batch_size=self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader("val", shuffle=False, batch_size=self._eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader("test", shuffle=False, batch_size=self._eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the test split (else validation), longest first; `batch["index"]` restores row order.

        Its labels are not read, so the split may have none; and when the tokenizer and the label
        names are given (as a checkpoint gives them to `gru-nlp predict`), no training split is read.
        """
        return self._dataloader("predict", shuffle=False, batch_size=self._eval_batch_size)

    @property
    def _eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or 2 * self.hparams.batch_size

    def _dataloader(self, role: str, shuffle: bool, batch_size: int) -> DataLoader:
        dataset = self._encoded_split(role)
        # Built inside the *_dataloader hook, so Lightning can rebuild it with a
        # DistributedSampler under DDP and pass it the epoch (see gru_nlp.batching).
        batch_sampler = BucketBatchSampler(
            _column(dataset, "length"),
            batch_size=batch_size,
            shuffle=shuffle,
            pool_size=self.hparams.pool_size,
            seed=self.hparams.seed,
        )
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            # Page-locked batches let the copy to a GPU run asynchronously (Lightning copies with non_blocking).
            pin_memory=self.trainer is not None and self.trainer.strategy.root_device.type == "cuda",
        )

    def predict_texts(self) -> tuple[list[int], list[str]]:
        """What `predict_dataloader` serves, in order (`batch["index"]` indexes these lists): each
        text's row number in its split as loaded (rows without text are skipped), and the text."""
        split = self._texts_to_predict()
        return _column(split, "source_row"), _column(split, "text")

    def _encoded_split(self, role: str) -> Dataset:
        """The split of `role` as `input_ids`, `length`, `index` and (but to predict) `labels` columns."""
        if role in self._encoded:
            return self._encoded[role]
        if role == "predict":
            split = self._texts_to_predict()
        elif role == "test" and self._splits is None and self._reads_no_training_split:
            split = self._test_split_alone()
        else:
            splits = self._text_splits()
            if role not in splits:
                missing = f"there is no {role} split: set test_split to a split of {self.hparams.path}"
                raise DataError(self._unlabelled_test or missing)
            split = splits[role]
        # datasets fingerprints the function and fn_kwargs (the tokenizer hashes by
        # its JSON), so the same data and tokenizer hit the cache in a later run.
        self._encoded[role] = split.map(
            _encode_batch,
            batched=True,
            with_indices=True,
            remove_columns=["text"],
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "max_length": self.hparams.max_length,
                "truncation": self.hparams.truncation,
            },
            desc=f"Encoding {role}",
        )
        return self._encoded[role]

    @property
    def _reads_no_training_split(self) -> bool:
        """Whether the tokenizer and the label names are given, so that scoring a split needs no training data."""
        return self.hparams.tokenizer_path is not None and self._requested_label_names is not None

    def _texts_to_predict(self) -> Dataset:
        """The split `predict` reads, with columns `text` and `source_row`: the test split, else the
        validation split (named, else the source's, else carved from training); labels unread."""
        if self._predict_split is not None:
            return self._predict_split
        hp = self.hparams
        split = hp.test_split or hp.val_split or "validation"
        raw, sources = load_raw_splits(hp.path, hp.name, {split}, hp.cache_dir)
        if split not in raw:
            if hp.test_split is None and hp.val_split is None:
                self._predict_split = self._text_splits()["val"]  # carved from training
                return self._predict_split
            arg = "test_split" if hp.test_split else "val_split"
            raise _not_a_split(arg, split, hp.path, sources, f"set {arg} to the split to predict")
        dataset = raw[split]
        _check_columns(dataset, hp.text_field, None, split, sources[split])
        kept = _rows_with_text(_column_values(dataset, hp.text_field), split, sources[split], hp.text_field)
        skipped = len(kept) < len(dataset)
        self._predict_split = (dataset.select(kept) if skipped else dataset).map(
            _standardize,
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            features=Features({"text": Value("string"), "source_row": Value("int64")}),
            fn_kwargs={"text_field": hp.text_field, "source_rows": kept if skipped else None},
            desc=f"Reading {split}",
        )
        return self._predict_split

    def _text_splits(self) -> dict[str, Dataset]:
        """The cleaned splits by role (train, val, test), each with columns `text` and `labels`."""
        if self._splits is not None:
            return self._splits
        hp = self.hparams
        if hp.test_split == hp.train_split:  # predicting it, or testing a checkpoint on it alone, is allowed
            raise DataError(f"test_split={hp.test_split!r} is also the train_split: it would score the rows the model trains on")
        wanted = {hp.train_split, hp.val_split or "validation", hp.test_split} - {None}
        raw, sources = load_raw_splits(hp.path, hp.name, wanted, hp.cache_dir)
        for arg in ("train_split", "val_split", "test_split"):
            split = hp[arg]
            if split is not None and split not in raw:
                fix = f"set {arg} to one of them" + ("" if arg == "train_split" else " or to null")
                raise _not_a_split(arg, split, hp.path, sources, fix)
        val_split = hp.val_split
        if val_split is None and "validation" in raw and hp.test_split != "validation":
            val_split = "validation"
        named = {"train": hp.train_split, "val": val_split, "test": hp.test_split}

        rows: dict[str, tuple[Dataset, list, list]] = {}  # role -> dataset, kept row numbers, their labels
        for role, split in named.items():
            if split is None:
                continue
            dataset = raw[split]
            if role == "test" and hp.label_field not in dataset.column_names:
                # Only `gru-nlp test` needs its labels; a fit goes on without it (a Kaggle-style test file).
                self._unlabelled_test = (
                    f"split {split!r} ({sources[split]}) has no {hp.label_field!r} column (its columns: "
                    f"{dataset.column_names}), so it cannot be scored: `gru-nlp predict` labels it (if its labels are "
                    f"under another name, rename that column to {hp.label_field!r}: every split reads label_field)"
                )
                log.warning("Not reading the test split: %s", self._unlabelled_test)
                named["test"] = None
                continue
            _check_columns(dataset, hp.text_field, hp.label_field, split, sources[split])
            kept, labels = _usable_rows(dataset, hp.text_field, hp.label_field, split, sources[split])
            rows[role] = (dataset, kept, labels)

        train, _, train_labels = rows["train"]
        train_feature = train.features[hp.label_field]
        self._label_names, label_ids = _label_ids(
            train_feature,
            train_labels,
            self._requested_label_names,
            hp.train_split,
            sources[hp.train_split],
            self.trained_integer_labels,
        )
        self._integer_label_ids = {value: i for value, i in label_ids.items() if not isinstance(value, str)}
        splits = {}
        for role, (dataset, kept, labels) in rows.items():
            split = named[role]
            feature = dataset.features[hp.label_field]
            split_ids = _split_label_ids(labels, feature, train_feature, label_ids, self._label_names)
            splits[role] = self._labelled_split(dataset, kept, labels, split_ids, split, sources[split])

        trained_classes = set(_column(splits["train"], "labels"))
        untrained = [name for class_id, name in enumerate(self._label_names) if class_id not in trained_classes]
        if untrained:  # label_names named them (a ClassLabel or the config): the model could never predict them
            log.warning("Classes %s have no rows in split %r: the model cannot learn them", untrained, hp.train_split)
        if "val" not in splits:
            splits["train"], splits["val"] = self._carve_validation(splits["train"], sources[hp.train_split])
            named["val"] = f"carved from {hp.train_split}, {hp.val_carve}"
        rank_zero_info(self._summary(splits, named, label_ids))
        self._splits = splits
        return splits

    def _summary(self, splits: dict[str, Dataset], named: dict[str, str | None], label_ids: dict[Any, int]) -> str:
        """One line on what was read: the classes (and which label values became them, where those are
        not the names), and each role's split and rows per class, in class order."""
        names = self._label_names
        renamed = {value: names[i] for value, i in label_ids.items() if isinstance(value, int) and str(value) != names[i]}
        shown = ", ".join(f"{value!r} is {name!r}" for value, name in sorted(renamed.items())[:10])
        line = f"data: classes {names}" + (f" (label {shown}{', ...' if len(renamed) > 10 else ''})" if renamed else "")
        training_texts = set(_text_hashes(splits["train"])) if "train" in splits else set()
        for role in ("train", "val", "test"):
            if role in splits:
                counts = Counter(_column(splits[role], "labels"))
                source = "" if named[role] == role else f" ({named[role]})"
                shown = " / ".join(f"{counts[i]:,}" for i in range(len(names)))
                if role != "train" and (seen := sum(text in training_texts for text in _text_hashes(splits[role]))):
                    shown += f"; {seen:,} of its texts also in train"  # duplicates: scored on what was trained on
                line += f"; {role}{source} {len(splits[role]):,} rows ({shown})"
        return line

    def _labelled_split(
        self, dataset: Dataset, kept: list[int], labels: list, label_ids: dict[Any, int], split: str, source: str
    ) -> Dataset:
        """The `kept` rows of `dataset` as columns `text`, `labels` (class ids, by `label_ids`) and `source_row`."""
        hp = self.hparams
        feature = dataset.features[hp.label_field]
        given = self._requested_label_names is not None
        trained_on_names = self.trained_integer_labels == {}
        _check_labels(labels, kept, label_ids, feature, self._label_names, split, source, given, trained_on_names)
        skipped = len(kept) < len(dataset)
        if skipped:
            dataset = dataset.select(kept)
        features = Features(
            {"text": Value("string"), "labels": ClassLabel(names=self._label_names), "source_row": Value("int64")}
        )
        return dataset.map(
            _standardize,
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            features=features,
            fn_kwargs={
                "text_field": hp.text_field,
                "label_field": hp.label_field,
                "label_ids": label_ids,
                "source_rows": kept if skipped else None,
            },
            desc=f"Reading {split}",
        )

    def _test_split_alone(self) -> Dataset:
        """The test split, read without the training split: for a tokenizer and label names that are
        given (as a checkpoint gives them to `gru-nlp test`). Its labels are read as training reads a
        split's labels with `label_names` given."""
        hp = self.hparams
        split, names = hp.test_split, list(self._requested_label_names)
        raw, sources = load_raw_splits(hp.path, hp.name, {split}, hp.cache_dir)
        if split not in raw:
            raise _not_a_split("test_split", split, hp.path, sources, "set test_split to the split to test on")
        dataset, source = raw[split], sources[split]
        _check_columns(dataset, hp.text_field, hp.label_field, split, source)
        kept, labels = _usable_rows(dataset, hp.text_field, hp.label_field, split, source)
        feature = dataset.features[hp.label_field]
        if isinstance(feature, ClassLabel) and set(feature.names) <= set(names):
            label_ids = _split_label_ids(labels, feature, None, {}, names)  # its classes, by name
        else:
            label_ids = _label_ids(feature, labels, names, split, source, self.trained_integer_labels)[1]
        self._label_names = names
        test = self._labelled_split(dataset, kept, labels, label_ids, split, source)
        rank_zero_info(self._summary({"test": test}, {"test": split}, label_ids))
        return test

    def _carve_validation(self, train: Dataset, source: str) -> tuple[Dataset, Dataset]:
        """Split `train` into (train, validation) by `val_size` and `val_carve`."""
        hp = self.hparams
        val_size = hp.val_size if hp.val_size < 1 else int(hp.val_size)
        if hp.val_carve == "random":
            self._check_random_carve(Counter(_column(train, "labels")), val_size, source)
        try:
            if hp.val_carve == "random":
                carved = train.train_test_split(test_size=val_size, seed=hp.seed, stratify_by_column="labels")
                kept, val = carved["train"], carved["test"]
            else:
                if hp.val_carve == "tail":
                    train_rows, val_rows = tail_rows(train["labels"], val_size, self._label_names)
                else:
                    train_rows, val_rows = sentence_rows(train["text"], train["labels"], val_size, hp.seed)
                    log.info(
                        "Validating on %d whole texts of %s; training drops %d phrases found only inside them",
                        len(val_rows),
                        hp.train_split,
                        len(train) - len(train_rows) - len(val_rows),
                    )
                kept, val = train.select(train_rows), train.select(val_rows)
        except ValueError as err:  # e.g. a class with one example cannot be on both sides
            # A DataError (too many texts for the sentence carve) already says what to do.
            advice = "" if isinstance(err, DataError) else " Set val_split, or a val_size that leaves examples of every class on both sides."
            raise DataError(
                f"cannot carve a validation split (val_size={hp.val_size}, val_carve={hp.val_carve!r}) from split "
                f"{hp.train_split!r} of {source}: {str(err).rstrip('.')}.{advice}"
            ) from err
        self._check_carve_keeps_every_class(train, kept, source)
        return kept, val

    def _check_random_carve(self, class_rows: Counter, val_size: float, source: str) -> None:
        """A random carve is stratified: every class has rows on both sides, so each needs two rows and
        each side a row per class (datasets' own errors say this in sklearn's words)."""
        hp, classes = self.hparams, len(class_rows)
        lonely = sorted(self._label_names[class_id] for class_id, count in class_rows.items() if count < 2)
        if lonely:
            named = f"class {lonely[0]!r} has" if len(lonely) == 1 else f"classes {', '.join(map(repr, lonely))} have"
            raise DataError(
                f"{named} a single row in split {hp.train_split!r} ({source}): a random validation carve puts rows "
                "of every class on both sides. Add rows, drop the class, or set val_split"
            )
        total = class_rows.total()
        val_rows = math.ceil(val_size * total) if val_size < 1 else int(val_size)
        if val_rows < classes or total - val_rows < classes:
            side = "validation" if val_rows < classes else "training"
            raise DataError(
                f"val_size={hp.val_size} carves {val_rows} of the {total} rows of split {hp.train_split!r} ({source}) "
                f"for validation, leaving {side} fewer rows than the {classes} classes: a random carve puts rows of "
                f"every class on both sides. Set val_size to a fraction below 1 or a count from {classes} to "
                f"{total - classes}, or set val_split"
            )

    def _check_carve_keeps_every_class(self, before: Dataset, after: Dataset, source: str) -> None:
        missing = sorted(set(_column(before, "labels")) - set(_column(after, "labels")))
        if missing:
            names = [self._label_names[class_id] for class_id in missing]
            raise DataError(
                f"val_size={self.hparams.val_size} carves every row of class {', '.join(map(repr, names))} of split "
                f"{self.hparams.train_split!r} ({source}) into validation, leaving training none: "
                "set a smaller val_size, or val_split"
            )

    def _cached_trained_tokenizer(self, train: Dataset) -> Tokenizer:
        """Train a tokenizer on `train`, or load the one an earlier run or process trained on it."""
        hp = self.hparams
        settings = {
            "data": train._fingerprint,  # changes with the files, the split and the carve
            "vocab_size": self._max_vocab_size,
            "model": hp.tokenizer_model,
            "lowercase": hp.lowercase,
            "min_frequency": hp.min_frequency,
            "version": _TOKENIZER_CACHE_VERSION,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        path = tokenizer_cache_folder(hp.cache_dir) / f"{key}.json"
        # Training is not deterministic (ties between equally frequent pairs), so the
        # processes of a DDP run must share one tokenizer: the first trains, the others wait.
        with FileLock(f"{path}.lock"):
            if path.exists():
                log.info("Loading the cached tokenizer %s", path)
                return load_tokenizer(path)
            log.info("Training a %s tokenizer on %d texts", hp.tokenizer_model, len(train))
            tokenizer = train_tokenizer(
                (text for batch in train.iter(batch_size=1000) for text in batch["text"]),
                vocab_size=self._max_vocab_size,
                model=hp.tokenizer_model,
                lowercase=hp.lowercase,
                min_frequency=hp.min_frequency,
            )
            save_tokenizer(tokenizer, path)
        return tokenizer


def _not_a_split(arg: str, split: str, path: str, sources: dict[str, str], fix: str) -> DataError:
    """The error for a `*_split` setting naming a split the source does not have, listing those it has."""
    return DataError(f"{arg}={split!r} is not a split of {path} (it has {', '.join(sorted(sources)) or 'none'}): {fix}")


def tokenizer_cache_folder(cache_dir: str | None) -> Path:
    """The folder of cached tokenizers in `cache_dir` (else `DEFAULT_CACHE_DIR`), created if need be."""
    folder = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / "tokenizers"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError as err:
        problem = f"cannot create {folder} ({err.strerror or err})"
    else:
        problem = None if writable else f"cannot write in {folder}"
    if problem:
        named = f"cache_dir {cache_dir}" if cache_dir else f"the default cache folder {DEFAULT_CACHE_DIR}"
        raise DataError(f"{named}: {problem}; set cache_dir to a folder this process can write")
    return folder


def load_texts(path: str, splits: Collection[str], text_field: str = "text", cache_dir: str | None = None) -> list[str]:
    """The non-blank texts of `splits`, labels ignored (for language-model pretraining).

    `path` is read as `TextDataModule` reads it: a Hub dataset, or a local folder of data
    files named by split (`train.parquet`, `unsup.parquet`, ...). Texts come split by split,
    in file order.
    """
    loaded, sources = load_raw_splits(path, None, splits, cache_dir)
    texts = []
    for split in splits:
        if split not in loaded:
            there = f"; it has {', '.join(sorted(sources))}" if sources else ""
            raise DataNotFoundError(f"{path} has no split {split!r}{there}")
        if text_field not in loaded[split].column_names:
            columns = ", ".join(loaded[split].column_names)
            raise DataError(f"{sources[split]} (split {split!r}) has no column {text_field!r} (columns: {columns})")
        texts += [text for text in _column_values(loaded[split], text_field) if isinstance(text, str) and text.strip()]
    return texts


def _text_hashes(dataset: Dataset) -> Iterator[int]:
    """A hash of each text, read a batch at a time (a million long texts are never held at once)."""
    for batch in dataset.select_columns("text").iter(batch_size=10_000):
        yield from map(hash, batch["text"])


def _column(dataset: Dataset, name: str) -> list:
    """One column as a Python list (through Arrow: several times faster than `dataset[name]`)."""
    return dataset.with_format("arrow")[name].to_pylist()


def _check_columns(dataset: Dataset, text_field: str, label_field: str | None, split: str, source: str) -> None:
    """The text and (unless None) label columns exist, and the text column is not a column of numbers."""
    for column in filter(None, (text_field, label_field)):
        if column not in dataset.column_names:
            unlabelled = " (a split without labels cannot be trained or scored on: `gru-nlp predict` labels it)"
            raise DataError(
                f"column {column!r} not found in split {split!r} of {source}; it has columns "
                f"{dataset.column_names}: set text_field / label_field to the right names"
                + (unlabelled if column == label_field else "")
            )
    text = dataset.features[text_field]
    if isinstance(text, Value) and text.dtype not in ("string", "large_string", "null"):
        raise DataError(
            f"column {text_field!r} of split {split!r} ({source}) holds {text.dtype} values, not text: "
            "every value must be a string"
        )


def _column_values(dataset: Dataset, name: str) -> list:
    """One column's Python values.

    A JSON column that mixes types (a list or a number among strings) loads as a ``Json``
    feature whose Arrow values are each value's JSON text: read as they are, texts would
    gain quotes and labels new classes ('"neg"'). Decoded, the checks below see the values.
    """
    values = _column(dataset, name)
    if type(dataset.features[name]).__name__ == "Json":
        values = [None if value is None else json.loads(value) for value in values]
    return values


def _usable_rows(dataset: Dataset, text_field: str, label_field: str, split: str, source: str) -> tuple[list, list]:
    """The row numbers that have text, and their labels; raises on a missing label."""
    kept = _rows_with_text(_column_values(dataset, text_field), split, source, text_field)
    labels = _column_values(dataset, label_field)
    kept_labels = [labels[row] for row in kept]
    for row, label in zip(kept, kept_labels, strict=True):
        blank = isinstance(label, str) and not label.strip()  # as a csv's empty field, which reads as None
        if label is None or blank or (isinstance(label, float) and math.isnan(label)):
            raise DataError(f"row {row} of split {split!r} ({source}) has no label: fill it in or drop the row")
    return kept, kept_labels


def _rows_with_text(texts: list, split: str, source: str, text_field: str) -> list[int]:
    """The row numbers whose text is a non-blank string; warns how many others were skipped."""
    kept = [row for row, text in enumerate(texts) if isinstance(text, str) and text.strip()]
    if len(kept) < len(texts):
        first = next(row for row, text in enumerate(texts) if not (isinstance(text, str) and text.strip()))
        log.warning(
            "Skipped %d of %d rows of split %r (%s) whose text is missing, not a string or empty (first: row %d)",
            len(texts) - len(kept),
            len(texts),
            split,
            source,
            first,
        )
    if not kept and len(texts) == 1 and isinstance(texts[0], list | dict):  # one object of columns, read as one row
        raise DataError(
            f"split {split!r} of {source} holds one object of columns ({{{text_field!r}: [...], ...}}), which reads as "
            "a single row: write a list of records, [{...}, {...}], or JSON lines (pandas: "
            "to_json(path, orient='records', lines=True))"
        )
    if not kept:
        raise DataError(f"split {split!r} of {source} has no rows with text in column {text_field!r}")
    return kept


def _label_ids(
    feature: Any,
    labels: list,
    label_names: list[str] | None,
    split: str,
    source: str,
    trained_integer_labels: dict[int, int] | None = None,
) -> tuple[list[str], dict[Any, int]]:
    """The class names and the map from label value to class id, decided by the training split (or, scoring
    a checkpoint, by its label names and `trained_integer_labels`: `integer_label_ids`)."""
    if isinstance(feature, ClassLabel):
        names = label_names or feature.names
        if len(names) != feature.num_classes:
            raise DataError(f"label_names has {len(names)} names but {source} has {feature.num_classes} classes")
        if set(names) == set(feature.names):  # the same classes, perhaps in another order
            ids = {i: names.index(name) for i, name in enumerate(feature.names)}
        elif set(names).isdisjoint(feature.names):  # new names for the classes, in id order
            ids = {i: i for i in range(len(names))}
        else:
            raise DataError(
                f"label_names {list(names)} share some but not all of the class names {feature.names} of "
                f"split {split!r} ({source}): give the same names (in any order) or all new ones"
            )
    elif all(isinstance(label, str) for label in labels):
        names = label_names or sorted(set(labels))
        ids = {name: i for i, name in enumerate(names)}
        _warn_of_near_duplicate_classes(sorted(set(labels)), split, source)
    elif all(isinstance(label, int | float) and float(label).is_integer() for label in labels):
        # Booleans stay booleans, named "False" and "True" (ids 0 and 1, unless label_names name them).
        values = sorted({label if isinstance(label, bool) else int(label) for label in labels})
        if label_names:
            names, ids = label_names, integer_label_ids(values, label_names, trained_integer_labels)
        else:
            names, ids = [str(value) for value in values], {value: i for i, value in enumerate(values)}
    else:
        types = sorted({type(label).__name__ for label in labels})
        raise DataError(f"labels of split {split!r} ({source}) must be all integers or all strings, found {types}")
    if len(names) < 2:
        raise DataError(f"split {split!r} ({source}) has only the classes {names}: a classifier needs two or more")
    return list(names), ids


def _warn_of_near_duplicate_classes(values: list[str], split: str, source: str) -> None:
    """Warn of label values that differ only in case or surrounding spaces ("pos", "Pos", "pos "):
    each is a class of its own, which is seldom what was meant."""
    groups: dict[str, list[str]] = defaultdict(list)
    for value in values:
        groups[value.strip().casefold()].append(value)
    for group in (group for group in groups.values() if len(group) > 1):
        log.warning(
            "labels %s of split %r (%s) differ only in case or spaces, and are %d classes",
            ", ".join(map(repr, group)),
            split,
            source,
            len(group),
        )


def _split_label_ids(
    labels: list, feature: Any, train_feature: Any, label_ids: dict[Any, int], class_names: list[str]
) -> dict[Any, int]:
    """The map from a split's label values to class ids: the training split's, unless

    - the split's labels are a `ClassLabel` of its own, whose ids then find their classes by name
      (a file saved with `class_encode_column` numbers only the classes it has, in its own order);
    - they are the training labels written as another type (1 and 2 read from a csv, "1" and "2"
      from a json file): then they are matched by their text.
    """
    if not isinstance(feature, ClassLabel) or feature == train_feature:
        distinct = {label for label in labels if isinstance(label, str | int | float)}  # a JSON list is no label
        if isinstance(train_feature, ClassLabel) and not isinstance(feature, ClassLabel):
            # The training ids have names: labels written as those names (a csv's "neg") are matched by them.
            label_ids = label_ids | {train_feature.names[value]: class_id for value, class_id in label_ids.items()}
        by_text = {str(value): class_id for value, class_id in label_ids.items()}
        if not distinct <= label_ids.keys() and all(str(label) in by_text for label in distinct):
            return {label: by_text[str(label)] for label in distinct}
        return label_ids
    if isinstance(train_feature, ClassLabel):
        by_name = {train_feature.names[value]: class_id for value, class_id in label_ids.items()}
    else:
        by_name = {name: class_id for class_id, name in enumerate(class_names)}
    return {value: by_name[name] for value, name in enumerate(feature.names) if name in by_name}


def _check_labels(
    labels: list,
    rows: list[int],
    label_ids: dict[Any, int],
    feature: Any,
    class_names: list[str],
    split: str,
    source: str,
    names_given: bool = False,
    trained_on_names: bool = False,
) -> None:
    """Raise a DataError naming the first row whose label is no class. `trained_on_names`: the labels are read for
    a checkpoint whose training read its labels as names (so an integer is none of them)."""
    for row, label in zip(rows, labels, strict=True):
        if not isinstance(label, str | int | float) or label not in label_ids:
            named = isinstance(feature, ClassLabel) and isinstance(label, int) and 0 <= label < feature.num_classes
            shown = f"{label!r} ({feature.names[label]!r})" if named else repr(label)
            values = list(label_ids)
            classes = repr(class_names) if values in ([], class_names) else f"{class_names} (label values {values})"
            if trained_on_names and isinstance(label, int | float) and not isinstance(feature, ClassLabel):
                given = (
                    ": the checkpoint being scored or resumed was trained on labels written as these names, "
                    "so an integer is none of them; write the labels as names"
                )
            elif names_given:
                given = (
                    " that label_names gives (a config's own, or those of the checkpoint being scored or resumed, "
                    "which fit only the dataset they were written for)"
                )
            else:
                given = ""
            raise DataError(f"label {shown} at row {row} of split {split!r} ({source}) is not one of the classes {classes}{given}")


def _standardize(
    batch: dict[str, list],
    indices: list[int],
    text_field: str,
    source_rows: list[int] | None,
    label_field: str | None = None,
    label_ids: dict[Any, int] | None = None,
) -> dict:
    """The text, row in the source split (`source_rows` maps kept rows back; None: none skipped)
    and, given a `label_field`, class id."""
    columns = {
        "text": batch[text_field],
        "source_row": indices if source_rows is None else [source_rows[i] for i in indices],
    }
    if label_field is not None:
        columns["labels"] = [label_ids[label] for label in batch[label_field]]
    return columns


def _encode_batch(
    batch: dict[str, list], indices: list[int], tokenizer: Tokenizer, max_length: int, truncation: str
) -> dict:
    input_ids = encode(tokenizer, batch["text"], max_length=max_length, truncation=truncation)
    return {"input_ids": input_ids, "length": [len(ids) for ids in input_ids], "index": indices}
