"""Read a dataset's splits from the Hugging Face Hub, local data files, or an `aclImdb/` folder.

`load_raw_splits` gives each split as a `datasets.Dataset` with its columns as stored; choosing
columns, reading labels and carving validation are `gru_nlp.data`'s work.
"""

import bz2
import csv
import gzip
import lzma
import os
import re
from collections import defaultdict
from collections.abc import Collection, Iterator
from pathlib import Path

import datasets
from datasets import ClassLabel, Dataset, Features, Value

DATA_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json"}
# Text files may be compressed (train.jsonl.gz); datasets decompresses them as it reads.
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
# train-00000-of-00002.parquet (and older uploads' train-00000-of-00002-<hash>.parquet) are shards of "train"
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+(-[0-9a-f]{8,})?$")
_HUB_ID = re.compile(r"^\w[\w.-]*(/\w[\w.-]*)?$")  # "org/name" or "name"


class DataError(ValueError):
    """Data or data settings that cannot be used as given; the message names the file, split, column or label."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file or folder, or a tokenizer file, that does not exist."""


class HubUnreachableError(DataError, ConnectionError):
    """A Hub dataset that cannot be downloaded, with no local file of that name."""


def load_raw_splits(
    path: str, name: str | None, wanted: Collection[str], cache_dir: str | None
) -> tuple[dict[str, Dataset], dict[str, str]]:
    """Load the `wanted` splits that exist at `path`.

    Returns:
        The loaded splits by name, and a description of the source of every
        split there is (wanted or not), for error messages.
    """
    local = Path(path).expanduser()
    if local.exists():
        imdb_root = next(
            (root for root in (local, local / "aclImdb") if (root / "train" / "pos").is_dir()),
            None,
        )
        if imdb_root is not None:
            return _load_acl_imdb(imdb_root, wanted, cache_dir)
        saved_files = ("dataset_dict.json",), ("state.json", "dataset_info.json")  # DatasetDict, Dataset.save_to_disk
        if any(all((local / name).is_file() for name in names) for names in saved_files):
            return _load_saved_to_disk(local, wanted)
        return _load_data_files(local, wanted, cache_dir)
    if not _HUB_ID.match(path) or _data_format(Path(path)) is not None:
        raise DataNotFoundError(f"no such file or folder: {local}")
    try:
        loaded = datasets.load_dataset(path, name, cache_dir=cache_dir)
    except ConnectionError as err:
        raise HubUnreachableError(
            f"Could not reach the Hugging Face Hub to load {path!r} ({err}), and there is no local "
            f"file or folder called {path!r}. Without the Hub, set `path` to a local folder of "
            "parquet/csv/tsv/json/jsonl files named by split (train.parquet, test.parquet, ...), to a "
            "single data file, or to an aclImdb/ folder."
        ) from err
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataNotFoundError(f"no local file or folder {path!r}, and no Hub dataset of that name ({err})") from None
    except (datasets.exceptions.DatasetsError, ValueError) as err:  # e.g. a `name` the dataset does not have
        raise DataError(f"could not load Hub dataset {path!r}" + (f" ({name})" if name else "") + f": {err}") from None
    source = f"Hub dataset {path!r}" + (f" ({name})" if name else "")
    return dict(loaded), {split: source for split in loaded}


def _data_format(path: Path) -> str | None:
    """The `datasets` builder that reads a data file (json for `train.jsonl.gz`), or None if it is no data file."""
    suffixes = [suffix.lower() for suffix in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
        if suffixes == [".parquet"]:  # parquet compresses inside the file
            return None
    return DATA_EXTENSIONS.get(suffixes[-1]) if suffixes else None


def _without_data_suffixes(file: Path) -> str:
    """`train` for train.jsonl and train.jsonl.gz."""
    name = file.name.removesuffix(file.suffix) if file.suffix.lower() in COMPRESSIONS else file.name
    return name.removesuffix(Path(name).suffix)


def _split_files(path: Path) -> dict[str, list[Path]]:
    """The data files of each split in a data file or folder (or its `data/` folder, as the Hub lays shards out)."""
    kinds = f"{', '.join(DATA_EXTENSIONS)} files (or {'/'.join(COMPRESSIONS)} compressed text files)"
    if path.is_file():
        if _data_format(path) is None:
            raise DataError(f"{path} is not one of the {kinds}")
        return {"train": [path]}
    files = sorted(p for p in path.iterdir() if _data_format(p) is not None and p.is_file())
    if not files and (path / "data").is_dir():
        return _split_files(path / "data")
    if not files:
        raise DataNotFoundError(f"no {kinds} in {path}")
    splits: dict[str, list[Path]] = defaultdict(list)
    stems: dict[str, set[str]] = defaultdict(set)
    for file in files:
        stem = _SHARD_SUFFIX.sub("", _without_data_suffixes(file)).lower()
        split = SPLIT_ALIASES.get(stem, stem)
        splits[split].append(file)
        stems[split].add(stem)
        if len(stems[split]) > 1:
            raise DataError(f"{path} has several files for split {split!r}: {', '.join(map(str, splits[split]))}")
    return dict(splits)


def _load_data_files(path: Path, wanted: Collection[str], cache_dir: str | None) -> tuple[dict, dict[str, str]]:
    split_files = _split_files(path)
    sources = {split: ", ".join(map(str, files)) for split, files in split_files.items()}
    # Read only the wanted splits, so that an unused one (IMDB's 50,000 unsup reviews,
    # or a stray metadata .json beside the parquet files) costs nothing and breaks nothing.
    # Each split is read on its own terms: read together, datasets would make the splits
    # share one schema, refusing an extra column in one file, and giving every split the
    # ClassLabel names of one of them (a test file's own names discarded, its labels swapped).
    loaded = {split: _load_split_files(split, files, cache_dir) for split, files in split_files.items() if split in wanted}
    return loaded, sources


def _load_split_files(split: str, files: list[Path], cache_dir: str | None) -> Dataset:
    builders = {_data_format(file) for file in files}
    if len(builders) > 1:
        raise DataError(f"{', '.join(map(str, files))} mix {' and '.join(sorted(builders))} files: use one format per split")
    builder = builders.pop()
    for file in files:
        if file.stat().st_size == 0:
            raise DataError(f"{file} is empty")
        if builder != "parquet":
            # pyarrow's JSON reader keeps invalid UTF-8 in string columns, to fail later deep in to_pylist.
            _check_utf8(file)
    options = {}
    if builder in ("csv", "tsv"):
        # pandas reads "NA", "null", "nan" and friends as missing; here only an empty field is missing.
        options = {"keep_default_na": False, "na_values": [""]}
    if builder == "tsv":  # no quoting: a quote is part of the text (as in GLUE's .tsv files)
        options |= {"sep": "\t", "quoting": csv.QUOTE_NONE}
    try:
        return datasets.load_dataset(
            "csv" if builder == "tsv" else builder,
            data_files={split: [str(file) for file in files]},
            split=split,
            cache_dir=cache_dir,
            **options,
        )
    except Exception as err:  # datasets raises anything from StopIteration to ArrowInvalid here
        detail = " ".join(str(err.__cause__ or err).split())  # DatasetGenerationError says only "An error occurred"
        if "corresponds to no data" in detail:  # datasets' words for a split of no rows
            detail = "it has no rows"
        elif builder == "csv" and "Error tokenizing data" in detail:
            detail += " (is it comma-separated? A tab-separated file is read as such when named .tsv)"
        raise DataError(f"could not read {', '.join(map(str, files))} as {builder}: {detail}") from err


def _load_saved_to_disk(path: Path, wanted: Collection[str]) -> tuple[dict, dict[str, str]]:
    """A folder written by `Dataset.save_to_disk` (one split, read as `train`) or `DatasetDict.save_to_disk`."""
    try:
        # In memory: encoding it would otherwise write its cache files into the user's folder, not cache_dir.
        saved = datasets.load_from_disk(str(path), keep_in_memory=True)
    except (OSError, ValueError) as err:  # datasets' FileNotFoundError for a partial folder is an OSError
        raise DataError(f"could not read {path} as a folder saved by datasets' save_to_disk: {err}") from None
    splits = dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    sources = {split: f"{path} (save_to_disk)" for split in splits}
    return {split: dataset for split, dataset in splits.items() if split in wanted}, sources


def _load_acl_imdb(root: Path, wanted: Collection[str], cache_dir: str | None) -> tuple[dict, dict[str, str]]:
    """The aclImdb layout: `train/` and `test/` hold a folder of `.txt` reviews per class (`neg`, `pos`),
    named by its class; `train/unsup/` holds the unlabelled reviews (label -1), the split `unsup`."""
    classes = _acl_imdb_classes(root / "train")
    layout = {  # split -> the folder named in messages, and the folders of its reviews
        "train": (root / "train", [root / "train" / name for name in classes]),
        "test": (root / "test", [root / "test" / name for name in _acl_imdb_classes(root / "test", classes)]),
        "unsup": (root / "train" / "unsup", [root / "train" / "unsup"]),
    }
    folders = {split: review_folders for split, (folder, review_folders) in layout.items() if folder.is_dir() and review_folders}
    sources = {split: str(layout[split][0]) for split in folders}
    features = Features({"text": Value("string"), "label": ClassLabel(names=classes)})
    loaded = {}
    for split in folders.keys() & set(wanted):
        files = []
        for folder in folders[split]:
            names = sorted(os.listdir(folder), key=_natural_key)
            files += [str(folder / name) for name in names if name.endswith(".txt") and not name.startswith(".")]  # not ._1_7.txt
        # The sizes and modification times key the cache, so an edited file is read again.
        stats = [(stat.st_size, stat.st_mtime_ns) for stat in map(os.stat, files)]
        try:
            loaded[split] = Dataset.from_generator(
                _read_acl_imdb,
                features=features,
                cache_dir=cache_dir,
                gen_kwargs={"files": files, "stats": stats, "classes": tuple(classes)},  # a list would be sharded
                split=split,
            )
        except datasets.exceptions.DatasetGenerationError as err:
            # datasets wraps what the generator raised; the cause names the file.
            raise DataError(f"could not read {sources[split]}: {err.__cause__ or err}") from err
    return loaded, sources


def _acl_imdb_classes(folder: Path, known: list[str] | None = None) -> list[str]:
    """The class folders in an aclImdb `train/` or `test/` folder, sorted; a test folder's must be
    among the training folder's `known` ones."""
    if not folder.is_dir():
        return []
    # Not unsup's reviews, nor a hidden folder (.ipynb_checkpoints, .git): neither is a class.
    classes = sorted(
        entry.name for entry in folder.iterdir() if entry.is_dir() and entry.name != "unsup" and not entry.name.startswith(".")
    )
    unknown = sorted(set(classes) - set(known if known is not None else classes))
    if unknown:
        raise DataError(
            f"{folder} has review folders {unknown} that {folder.parent / 'train'} does not have "
            f"(its classes: {known}): a class needs training reviews"
        )
    return classes


def _read_acl_imdb(files: list[str], stats: list[tuple[int, int]], classes: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Yield one example per review file; the label is the name of its folder (-1, none, for `unsup`)."""
    for file in files:
        data = Path(file).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(_utf8_error(Path(file), data, err)) from None
        label = Path(file).parent.name
        yield {"text": text, "label": label if label in classes else -1}


def _check_utf8(path: Path) -> None:
    """Raise a ValueError naming the line and column of the first byte of `path` that is not UTF-8
    (of its decompressed text, for a compressed file)."""
    open_compressed = COMPRESSIONS.get(path.suffix.lower())
    try:
        if open_compressed is None:
            data = path.read_bytes()
        else:
            with open_compressed(path) as file:
                data = file.read()
    except (OSError, EOFError, lzma.LZMAError) as err:  # gzip's BadGzipFile is an OSError
        raise DataError(f"could not decompress {path}: {err}") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(_utf8_error(path, data, err)) from None


def _utf8_error(path: Path, data: bytes, err: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return (
        f"{path} is not valid UTF-8: byte 0x{data[err.start]:02x} at line {line}, column {column} "
        f"({err.reason}); re-save the file as UTF-8"
    )


def _natural_key(name: str) -> list:
    """Sort `10_3.txt` after `9_1.txt`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
