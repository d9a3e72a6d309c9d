"""``gru-nlp classify``: classify texts from arguments, a file or stdin, writing JSON lines.

    gru-nlp classify --ckpt best.ckpt "A quiet, moving film." "Dull."
    gru-nlp classify --ckpt best.ckpt --input reviews.jsonl --text-field review --output out.jsonl
    cat reviews.txt | gru-nlp classify --ckpt best.ckpt --explain --method integrated_gradients

Each input text gives one output line, in input order:
``{"text": ..., "label": ..., "score": ..., "probs": {label: prob}}`` (plus ``"empty": true``
for a text with nothing to read, and ``"explanation"`` with ``--explain``).

``--input`` is read by its extension (text formats as UTF-8, with or without a byte-order mark):

* ``.csv``: the ``--text-field`` column (default ``text``), with a header row; an empty or
  missing cell is an empty text.
* ``.tsv``: the same, tab-separated.
* ``.jsonl``: one JSON object per line, its ``--text-field`` field (a null is an empty text);
  blank lines are skipped.
* ``.json``: one JSON list, of strings or of objects with the ``--text-field`` field.
* ``.parquet``: the ``--text-field`` column, which must hold strings; a null is an empty text.
* anything else, and stdin (``--input -``, or no texts given): plain text, one text per
  line, blank lines included, so output line i always belongs to input line i. ``--text-field`` does not apply (nor to texts given as
  arguments or on stdin), and giving it is an error.

Mistakes (a missing file, a bad checkpoint, a missing column, bad JSON, a csv quote left
open, a file that is not parquet, bytes that are not UTF-8) print one line to stderr and exit with status 2, without a traceback.
Stopped by SIGTERM or Ctrl-C, it exits with status 143 or 130, and an ``--output`` file keeps what
it held before (nothing half-written is left, under its name or beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO

from gru_nlp.api import METHODS, TextClassifier
from gru_nlp.files import atomic_write

# Texts read and classified together; bounds memory on huge inputs while keeping batches full.
CHUNK_SIZE = 2048
# Below this many texts given as arguments a progress bar is noise (a file always shows one: its size is unknown).
PROGRESS_MIN_TEXTS = 2000
# --input extensions read as columns or fields (--text-field); any other is read as plain lines.
COLUMN_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
DEFAULT_TEXT_FIELD = "text"


class InputError(ValueError):
    """The input file cannot be read as asked (e.g. a missing column)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``gru-nlp classify`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="gru-nlp classify",
        description="Classify texts with a trained checkpoint; writes one JSON line per text.",
    )
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (else --input, else stdin)")
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint saved by gru-nlp fit")
    parser.add_argument(
        "--input",
        type=Path,
        help="file of texts: .csv, .tsv, .jsonl, .json or .parquet (see --text-field), else one text per line; - is stdin",
    )
    # Default None, not "text", so that run() can tell a --text-field given for plain lines.
    parser.add_argument(
        "--text-field",
        default=None,
        help=f"column holding the text in .csv / .tsv / .parquet input; field of each object in .jsonl / "
        f".json input (default: {DEFAULT_TEXT_FIELD}); an error for other input",
    )
    parser.add_argument("--output", type=Path, help="write here (atomically) instead of stdout")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--quantize", action="store_true", help="int8 dynamic quantization (CPU)")
    parser.add_argument("--explain", action="store_true", help="add per-word weights (one pass per text; slower)")
    parser.add_argument("--method", choices=METHODS, default="attention", help="explanation method for --explain")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run ``gru-nlp classify`` with ``argv`` (without the ``classify`` word)."""
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_as_exit():
            run(args)
    except KeyboardInterrupt:  # Ctrl-C: the unfinished --output file is already removed; no traceback
        print("gru-nlp classify: interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        # Python would complain again when flushing stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    # CheckpointError, InputError and UnicodeDecodeError are ValueErrors, as are user
    # mistakes such as --quantize with --device cuda; FileNotFoundError is an OSError.
    except (ValueError, OSError, csv.Error) as error:
        print(f"gru-nlp classify: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args: argparse.Namespace) -> None:
    """Classify the texts ``args`` names and write the JSON lines."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.input == Path("-"):  # the usual name for stdin
        args.input = None
    if args.texts and args.input is not None:
        raise ValueError("give texts as arguments or --input, not both")
    if args.input is not None and args.input.is_dir():
        raise ValueError(f"--input {args.input} is a folder: name the file of texts")
    if args.input is not None and not args.input.exists():  # a pipe (`--input <(...)`) is read as a file
        raise FileNotFoundError(f"input file not found: {args.input}")
    if args.output is not None and args.output.is_dir():
        raise ValueError(f"--output {args.output} is a folder: name the file to write")
    if args.output is not None and args.input is not None and args.output.resolve() == args.input.resolve():
        raise ValueError(f"--output {args.output} is the --input file: the predictions would replace the texts")
    if args.output is not None and args.output.resolve() == args.ckpt.resolve():
        raise ValueError(f"--output {args.output} is the --ckpt file: the predictions would replace the model")
    reads_columns = not args.texts and args.input is not None and args.input.suffix.lower() in COLUMN_SUFFIXES
    if args.text_field is not None and not reads_columns:
        if args.texts:
            given = "texts given as arguments"
        elif args.input is None:
            given = "plain lines from stdin"
        else:
            given = f"{args.input}, read as plain lines"
        raise ValueError(f"--text-field applies to csv/tsv/jsonl/json/parquet inputs only, not to {given}")
    text_field = DEFAULT_TEXT_FIELD if args.text_field is None else args.text_field
    classifier = TextClassifier.from_checkpoint(args.ckpt, device=args.device, quantize=args.quantize)
    if args.texts:
        texts: Iterable[str] = args.texts
    elif args.input is not None:
        texts = read_texts(args.input, text_field)
    else:
        texts = _stdin_lines()
    show_progress = sys.stderr.isatty() and (args.input is not None or len(args.texts) >= PROGRESS_MIN_TEXTS)
    if args.output is None:
        write_lines(classifier, texts, sys.stdout, args, show_progress)
        return
    with atomic_write(args.output) as out:  # a failure never leaves half a file under its name
        write_lines(classifier, texts, out, args, show_progress)


def write_lines(
    classifier: TextClassifier, texts: Iterable[str], out: IO[str], args: argparse.Namespace, show_progress: bool
) -> None:
    """Classify ``texts`` chunk by chunk and write one JSON line each to ``out``."""
    progress = _progress_bar() if show_progress else None
    iterator = iter(texts)
    while chunk := list(islice(iterator, CHUNK_SIZE)):
        for prediction in classifier.predict(chunk, batch_size=args.batch_size):
            record = prediction.to_dict()
            if args.explain:
                # Its label is the fp32 model's, which the weights explain; with --quantize the line's own
                # label is the int8 model's and can differ near a tie.
                record["explanation"] = classifier.explain(prediction.text, method=args.method).to_dict()
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        if progress is not None:
            progress.update(len(chunk))
    if progress is not None:
        progress.close()


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM (``kill``, a scheduler's time limit) into SystemExit(143) while the block runs.

    Python's default for SIGTERM ends the process at once, leaving the unfinished temporary
    ``--output`` file behind; as an exception it unwinds through `atomic_write`, which removes it.
    """
    # Only the main thread may set handlers; a SIGTERM ignored on purpose (by a supervisor) stays ignored.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield
        return

    def exit_143(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_143)
    try:
        yield
    finally:
        # None: a handler set outside Python, which cannot be put back; the default is the nearest.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _stdin_lines() -> Iterator[str]:
    """Lines of stdin read as UTF-8, strictly (not with the lenient decoding Python gives stdin where
    the locale is C), a byte-order mark skipped."""
    stream = sys.stdin
    if hasattr(stream, "buffer"):  # a real stream, not a StringIO
        stream = io.TextIOWrapper(stream.buffer, encoding="utf-8-sig", errors="strict", newline="\n")
    try:
        for line in stream:
            yield line.rstrip("\r\n")
    except UnicodeDecodeError as error:
        bad_byte = error.object[error.start : error.start + 1]
        raise InputError(f"stdin: not valid UTF-8 text (found byte {bad_byte!r})") from None


def read_texts(path: Path, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """Texts from ``path``: a column of a .csv, .tsv or .parquet, a field of a .jsonl, a list in a .json,
    else one per line.

    A UTF-8 byte-order mark (as Excel writes) is skipped.

    Raises:
        InputError: the column or field is missing, a value (or a .parquet column) is not a
            string, a .jsonl line or a .json file is not JSON, a .json file is not a list,
            or a .parquet file cannot be read as parquet.
    """
    try:
        yield from _read_texts(path, text_field)
    except UnicodeDecodeError as error:
        compression = _compression(path)
        if compression:
            raise InputError(f"{path}: is {compression}-compressed: decompress it, and pass the decompressed file") from None
        bad_byte = error.object[error.start : error.start + 1]
        raise InputError(f"{path}: not valid UTF-8 text (found byte {bad_byte!r}); re-save the file as UTF-8") from None


def _compression(path: Path) -> str | None:
    """"gzip", "bzip2" or "xz" if the file starts as such a file does; else None (and for a pipe, read already)."""
    if not path.is_file():
        return None
    with open(path, "rb") as file:
        start = file.read(6)
    magic = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
    return next((name for prefix, name in magic.items() if start.startswith(prefix)), None)


def _read_texts(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, text_field)
        return
    delimited = suffix in (".csv", ".tsv")
    # "utf-8-sig" skips a byte-order mark, which would otherwise be part of the first column's name.
    # Lines end at "\n" only (a "\r\n" ending is stripped below): a lone "\r" inside a text does not split it.
    with path.open(encoding="utf-8-sig", newline="" if delimited else "\n") as file:
        if delimited:
            # Reviews can be long: lift the csv module's default 128 KiB limit per field.
            csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
            # A tab-separated file has no quoting: a quote is part of its text (as in GLUE's files).
            dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
            # strict: a quote left open is an error, not a field that swallows the rows after it.
            reader = csv.DictReader(file, strict=True, **dialect)
            if reader.fieldnames is None or text_field not in reader.fieldnames:
                raise InputError(
                    f"{path}: no column {text_field!r} (columns: {', '.join(reader.fieldnames or [])}); "
                    "choose one with --text-field"
                )
            try:
                for row in reader:
                    yield row[text_field] or ""
            except csv.Error as error:  # line_num counts the lines of the rows read whole
                raise InputError(f"{path}:{reader.line_num + 1}: not valid {suffix[1:]} ({error})") from None
        elif suffix == ".jsonl":
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{number}: not a JSON line ({error.msg})") from None
                yield _field_text(record, text_field, f"{path}:{number}")
        elif suffix == ".json":
            try:
                records = json.load(file)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
            if not isinstance(records, list):
                raise InputError(
                    f"{path}: expected a JSON list of strings or of objects with field {text_field!r} "
                    "(for one object per line, name the file .jsonl)"
                )
            for index, record in enumerate(records):
                yield record if isinstance(record, str) else _field_text(record, text_field, f"{path}: item {index}")
        else:
            for line in file:
                yield line.rstrip("\r\n")


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` column of a parquet file, read a chunk at a time; a null is an empty text."""
    import pyarrow as pa  # a dependency of datasets; imported here, as only parquet input needs it
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        if text_field not in schema.names:
            raise InputError(
                f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); choose one with --text-field"
            )
        column_type = schema.field(text_field).type
        value_type = column_type.value_type if pa.types.is_dictionary(column_type) else column_type
        if not (
            pa.types.is_string(value_type)
            or pa.types.is_large_string(value_type)
            or getattr(pa.types, "is_string_view", lambda _: False)(value_type)
            or pa.types.is_null(value_type)  # a column of nulls only: empty texts
        ):
            raise InputError(
                f"{path}: column {text_field!r} holds {column_type}, not strings; choose a text column with --text-field"
            )
        for batch in parquet.iter_batches(batch_size=CHUNK_SIZE, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield "" if value is None else value
    except pa.ArrowException as error:
        # e.g. "Parquet magic bytes not found in footer ..." for a file that is not parquet.
        message = " ".join(str(error).split())
        raise InputError(f"{path}: not a readable parquet file ({message})") from None


def _field_text(record: object, text_field: str, where: str) -> str:
    """The string in ``record[text_field]``; ``where`` (file and line or item) prefixes errors."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: not a JSON object with field {text_field!r}")
    if text_field not in record:
        raise InputError(f"{where}: no field {text_field!r}; choose one with --text-field")
    if record[text_field] is None:  # as a null in parquet or an empty csv field: an empty text
        return ""
    if not isinstance(record[text_field], str):
        raise InputError(f"{where}: field {text_field!r} is not a string")
    return record[text_field]


def _progress_bar():
    """A tqdm bar on stderr, or None where tqdm is not installed (it comes with Lightning)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(unit=" texts", file=sys.stderr, dynamic_ncols=True)
