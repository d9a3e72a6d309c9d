"""How integer labels map to class ids, shared by training (`TextDataModule`) and scoring (`TextClassifier`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def integer_label_ids(values: Iterable[int], names: Sequence[str]) -> dict[int, int]:
    """The class id of each integer label value, given the class names.

    By name when every value is itself one of the names (labels 1 and 2 of classes "1" and
    "2", as a checkpoint names them; True of class "True"); otherwise each value 0..K-1 is its
    own id (False and True are 0 and 1).
    """
    names = list(names)
    distinct = set(values)
    if all(str(value) in names for value in distinct):
        return {value: names.index(str(value)) for value in distinct}
    return {i: i for i in range(len(names))}
