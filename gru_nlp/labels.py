"""How integer labels map to class ids, shared by training (`TextDataModule`) and scoring (`TextClassifier`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def integer_label_ids(
    values: Iterable[int], names: Sequence[str], trained: Mapping[int, int] | None = None
) -> dict[int, int]:
    """The class id of each integer label value, given the class names.

    By name when every value is itself one of the names (labels 1 and 2 of classes "1" and
    "2", as a checkpoint names them; True of class "True"). Otherwise, for a model whose
    checkpoint records how its training read integer labels (`trained`: {value: class id},
    empty when it read names), as its training did: labels 0, 1, 2 of a model trained on
    "neg", "mid", "pos" are no class, and 0 of one trained on star ratings 1, 3, 5 is none
    either. Failing both, each value 0..K-1 is its own id (False and True are 0 and 1).
    """
    names = list(names)
    distinct = set(values)
    if all(str(value) in names for value in distinct):
        return {value: names.index(str(value)) for value in distinct}
    if trained is not None:
        return dict(trained)
    return {i: i for i in range(len(names))}
