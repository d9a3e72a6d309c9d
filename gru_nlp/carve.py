"""Which training rows validate, when the data has no validation split (`TextDataModule`'s `val_carve`).

`"random"` is `datasets`' own stratified `train_test_split`; this module holds the other two:
`tail_rows`, each class's last rows (neighbouring rows belong together, as one movie's IMDB reviews
do), and `sentence_rows`, whole texts and the phrases only they contain (SST-2's phrase-level split).
"""

import math
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import Literal, get_args

from gru_nlp.sources import DataError

ValCarve = Literal["random", "tail", "sentences"]
VAL_CARVES: tuple[str, ...] = get_args(ValCarve)
# `sentence_rows` holds every run of words of the whole texts in memory: SST-2 has 5.5M.
MAX_WORD_RUNS = 50_000_000


def tail_rows(labels: list[int], val_size: float, names: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Row numbers (train, validation): each class's last rows, in proportion to its share, validate.

    `val_size` is a fraction below 1 (of all rows, rounded up) or a count, shared out
    between the classes by largest remainder. `names` name the classes in errors.
    """
    total = math.ceil(val_size * len(labels)) if val_size < 1 else int(val_size)
    rows_by_class: dict[int, list[int]] = defaultdict(list)
    for row, label in enumerate(labels):
        rows_by_class[label].append(row)
    shares = {label: total * len(rows) / len(labels) for label, rows in rows_by_class.items()}
    counts = {label: math.floor(share) for label, share in shares.items()}
    for label in sorted(shares, key=lambda label: counts[label] - shares[label])[: total - sum(counts.values())]:
        counts[label] += 1
    for label, rows in rows_by_class.items():
        if not 0 < counts[label] < len(rows):
            name = repr(names[label]) if names else label
            raise ValueError(f"class {name} has {len(rows)} rows, so its share of validation would be {counts[label]}.")
    val_rows = sorted(row for label, rows in rows_by_class.items() for row in rows[len(rows) - counts[label] :])
    val_set = set(val_rows)
    return [row for row in range(len(labels)) if row not in val_set], val_rows


def sentence_rows(texts: list[str], labels: list[int], val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Row numbers (train, validation) for phrase-level data: whole texts validate, their phrases leave training.

    A whole text is one that no longer text contains as a run of whitespace-separated
    words. `val_size` of the whole texts (a fraction, rounded up, or a count) are drawn
    per class with `seed` and validate, duplicates included. Training keeps every other
    row but the phrases found only inside validation texts: a phrase that is also inside
    a training text (a common "the film") stays.
    """
    words = [text.split() for text in texts]
    runs = sum(len(row) * (len(row) + 1) // 2 for row in words)
    if runs > MAX_WORD_RUNS:
        raise DataError(
            f"val_carve 'sentences' compares every run of words in every text, {runs:,} here (at most "
            f"{MAX_WORD_RUNS:,}): it is meant for short phrase-level texts such as SST-2's; use 'random' or 'tail'."
        )
    rows_by_whole: dict[str, list[int]] = {}  # whole text -> its rows
    covered: set[str] = set()  # every word run of the whole texts seen so far
    for row in sorted(range(len(texts)), key=lambda row: -len(words[row])):  # longest first
        text = " ".join(words[row])
        if text in rows_by_whole:
            rows_by_whole[text].append(row)
        elif text not in covered:
            rows_by_whole[text] = [row]
            covered.update(word_runs(words[row]))
    del covered
    wholes = sorted(rows_by_whole, key=lambda text: rows_by_whole[text][0])  # in row order, then shuffled
    random.Random(seed).shuffle(wholes)
    train_wholes, val_wholes = tail_rows([labels[rows_by_whole[text][0]] for text in wholes], val_size)
    only_in_val = {run for i in val_wholes for run in word_runs(wholes[i].split())}
    for i in train_wholes:
        only_in_val.difference_update(word_runs(wholes[i].split()))
    val_rows = sorted(row for i in val_wholes for row in rows_by_whole[wholes[i]])
    train_rows = [row for row in range(len(texts)) if " ".join(words[row]) not in only_in_val]
    return train_rows, val_rows


def word_runs(words: list[str]) -> Iterator[str]:
    """Every run of consecutive words, joined by single spaces (the whole text included)."""
    return (" ".join(words[start:end]) for start in range(len(words)) for end in range(start + 1, len(words) + 1))
