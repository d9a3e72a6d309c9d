"""How integer labels map to class ids, shared by training (`TextDataModule`) and scoring (`TextClassifier`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def integer_label_ids(
    values: Iterable[int], names: Sequence[str], trained: Mapping[int, int] | None = None
) -> dict[int, int]:
    """The class id of each integer label value, given the class names.

    For a model whose checkpoint records how its training read integer labels (`trained`:
    {value: class id}, empty when it read names), as its training did: labels 0, 1, 2 of a
    model trained on "neg", "mid", "pos" are no class, and 0 of one trained on star ratings
    1, 3, 5 is none either. Otherwise by name when every value is itself one of the names
    (labels 1 and 2 of classes "1" and "2"; True of class "True"), and by position failing
    that: each value 0..K-1 is its own id (False and True are 0 and 1).
    """
    names = list(names)
    distinct = set(values)
    if trained:
        return dict(trained)
    if all(str(value) in names for value in distinct):
        by_name = {value: names.index(str(value)) for value in distinct}
        # Every class named by an integer, so that this map, recorded, reads labels absent here too.
        return by_name | {int(name): i for i, name in enumerate(names) if _names_an_integer(name) and int(name) not in by_name}
    if trained is not None:  # {}: trained on names, so no integer is a class
        return {}
    return {i: i for i in range(len(names))}


def _names_an_integer(name: str) -> bool:
    """Whether a class name is an integer written plainly ("3", "-1"; not "03" or " 3")."""
    try:
        return str(int(name)) == name
    except ValueError:
        return False
