"""``gru-nlp classify``: texts from arguments, stdin and files, JSON lines out, clean errors."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gru_nlp.classify import build_parser, main


def run(capsys, argv: list[str]) -> tuple[int, list[dict], str]:
    """Run classify in-process; return (exit code, parsed output lines, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def check_records(records: list[dict], texts: list[str]) -> None:
    assert [record["text"] for record in records] == texts
    for record in records:
        assert record["label"] in record["probs"]
        assert record["score"] == record["probs"][record["label"]]
        assert sum(record["probs"].values()) == pytest.approx(1.0, abs=1e-5)


def test_texts_from_arguments_via_cli(tiny_checkpoint, capsys):
    from gru_nlp.cli import main as cli_main

    cli_main(["classify", "--ckpt", str(tiny_checkpoint), "a bad film", "good, lovely"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    check_records(records, ["a bad film", "good, lovely"])


def test_texts_from_stdin_keep_blank_lines(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a bad film\n\nvery good 映画 😀\n"))
    code, records, _ = run(capsys, ["--ckpt", str(tiny_checkpoint)])
    assert code == 0
    check_records(records, ["a bad film", "", "very good 映画 😀"])
    assert records[1]["empty"] is True and "empty" not in records[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO("a bad film\n"))
    assert run(capsys, ["--ckpt", str(tiny_checkpoint), "--input", "-"])[1][0]["text"] == "a bad film"  # - is stdin


def test_an_output_that_is_the_input_the_checkpoint_or_a_folder_is_refused_before_any_work(tiny_checkpoint, capsys, tmp_path):
    source = _write(tmp_path / "texts.txt", "a bad film\ngood\n")
    model = tmp_path / "model.ckpt"
    model.write_bytes(tiny_checkpoint.read_bytes())
    for output, message in ((source, "is the --input file"), (tmp_path, "is a folder"), (model, "is the --ckpt file")):
        code, printed, err = run(capsys, ["--ckpt", str(model), "--input", str(source), "--output", str(output)])
        assert code == 2 and printed == [] and message in err
    assert source.read_text() == "a bad film\ngood\n" and model.read_bytes() == tiny_checkpoint.read_bytes()


def test_a_reader_that_stops_early_is_not_an_error(tiny_checkpoint):
    reader = subprocess.Popen(
        [sys.executable, "-m", "gru_nlp.cli", "classify", "--ckpt", str(tiny_checkpoint)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    reader.stdout.close()  # as `| head -0` does
    _, err = reader.communicate("a bad film\n" * 5000, timeout=120)
    assert reader.returncode == 0 and "Broken pipe" not in err, err


def test_a_tsv_file_has_no_quoting(tiny_checkpoint, capsys, tmp_path):
    # As in GLUE's files: a quote is part of the text, and a lone one does not swallow the next rows.
    source = _write(tmp_path / "quoted.tsv", 'text\tid\n"Great" fun.\t1\n"Awful.\t2\nA mess.\t3\n')
    code, printed, _ = run(capsys, ["--ckpt", str(tiny_checkpoint), "--input", str(source)])
    assert code == 0 and [record["text"] for record in printed] == ['"Great" fun.', '"Awful.', "A mess."]


def test_stdin_is_read_as_utf8_without_its_byte_order_mark_and_bad_bytes_are_an_error(tiny_checkpoint):
    def classify(stdin: bytes) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "gru_nlp.cli", "classify", "--ckpt", str(tiny_checkpoint)]
        return subprocess.run(command, input=stdin, capture_output=True, timeout=120, env={**os.environ, "LC_ALL": "C"})

    with_mark = classify("\ufeffgood film\n".encode())
    assert with_mark.returncode == 0 and json.loads(with_mark.stdout)["text"] == "good film"
    not_utf8 = classify(b"good\n\xff bad\n")
    assert not_utf8.returncode == 2 and not_utf8.stderr.decode().strip() == (
        "gru-nlp classify: error: stdin: not valid UTF-8 text (found byte b'\\xff')"
    )


def test_a_lone_carriage_return_does_not_split_a_line(tiny_checkpoint, capsys, tmp_path):
    source = tmp_path / "texts.txt"
    source.write_bytes(b"first review\rstill the first\r\nsecond\n")
    code, printed, _ = run(capsys, ["--ckpt", str(tiny_checkpoint), "--input", str(source)])
    assert code == 0 and [r["text"] for r in printed] == ["first review\rstill the first", "second"]


def test_a_jsonl_null_is_an_empty_text_as_in_parquet_and_csv(tiny_checkpoint, capsys, tmp_path):
    source = _write(tmp_path / "t.jsonl", '{"text": "good"}\n{"text": null}\n')
    code, printed, _ = run(capsys, ["--ckpt", str(tiny_checkpoint), "--input", str(source)])
    assert code == 0 and [(r["text"], r.get("empty", False)) for r in printed] == [("good", False), ("", True)]


def test_a_csv_quote_left_open_is_an_error_not_a_text_that_swallows_the_rows_after_it(tiny_checkpoint, capsys, tmp_path):
    source = _write(tmp_path / "open.csv", 'id,text\n1,good film\n2,"bad film\n3,awful\n4,loved it\n')
    code, printed, err = run(capsys, ["--ckpt", str(tiny_checkpoint), "--input", str(source)])
    assert code == 2 and printed == [] and "open.csv:3: not valid csv (unexpected end of data)" in err


@pytest.mark.parametrize(
    "name, content, field",
    [
        ("texts.txt", "a bad film\ngood\n", None),
        ("texts.csv", 'id,review\n1,a bad film\n2,"good"\n', "review"),
        ("texts.jsonl", '{"text": "a bad film", "label": "neg"}\n\n{"text": "good"}\n', "text"),
        ("texts.json", '["a bad film", "good"]', "text"),
        ("texts.json", '[{"review": "a bad film"}, {"review": "good", "id": 2}]', "review"),
        ("bom.csv", "\ufefftext,label\na bad film,neg\ngood,pos\n", "text"),
        ("bom.txt", "\ufeffa bad film\ngood\n", None),
        # The header row is read as column names, not classified; commas are not separators.
        ("texts.tsv", "id\treview\tnote\n1\ta bad film\ta, b\n2\tgood\t\n", "review"),
        ("bom.TSV", "\ufefftext\tlabel\r\na bad film\tneg\r\ngood\tpos\r\n", None),
    ],
    ids=["txt", "csv", "jsonl", "json-strings", "json-objects", "csv-bom", "txt-bom", "tsv", "tsv-bom-default-field"],
)
def test_texts_from_file_to_output_file(tiny_checkpoint, capsys, tmp_path, name, content, field):
    source = tmp_path / name
    source.write_text(content, encoding="utf-8")
    target = tmp_path / "out" / "predictions.jsonl"
    argv = ["--ckpt", str(tiny_checkpoint), "--input", str(source), "--output", str(target)]
    argv += [] if field is None else ["--text-field", field]
    code, printed, _ = run(capsys, argv)
    assert code == 0 and printed == []
    check_records([json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()], ["a bad film", "good"])
    assert [p.name for p in target.parent.iterdir()] == ["predictions.jsonl"]  # no temporary file left


@pytest.mark.parametrize(
    "column, field",
    [
        (pa.array(["a bad film", None, "good"]), None),
        (pa.array(["a bad film", None, "good"], type=pa.large_string()), "review"),
        (pa.array(["a bad film", None, "good"]).dictionary_encode(), "review"),
    ],
    ids=["string-default-field", "large-string", "dictionary"],
)
def test_parquet_column_is_read_with_nulls_as_empty_texts(tiny_checkpoint, capsys, tmp_path, column, field):
    source = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], field or "text": column}), source)
    code, records, err = run(capsys, ["--ckpt", str(tiny_checkpoint), "--input", str(source)] + (["--text-field", field] if field else []))
    assert code == 0, err
    check_records(records, ["a bad film", "", "good"])  # one line per row, in row order
    assert records[1]["empty"] is True and "empty" not in records[0]


def test_help_lists_the_input_formats():
    help_text = build_parser().format_help()
    assert all(suffix in help_text for suffix in (".csv", ".tsv", ".jsonl", ".json", ".parquet"))


def test_explain_adds_word_weights(tiny_checkpoint, capsys):
    code, records, _ = run(capsys, ["--ckpt", str(tiny_checkpoint), "--explain", "--method", "grad_x_input", "good film"])
    assert code == 0
    explanation = records[0]["explanation"]
    assert explanation["method"] == "grad_x_input" and explanation["words"] == ["good", "film"]
    assert sum(explanation["weights"]) == pytest.approx(1.0, abs=1e-4)
    assert explanation["label"] == records[0]["label"]  # fp32 both: the explained label is the one served


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda tmp, ckpt: ["--ckpt", str(tmp / "missing.ckpt"), "x"], "checkpoint not found"),
        (lambda tmp, ckpt: ["--ckpt", str(_write(tmp / "bad.ckpt", "not a checkpoint")), "x"], "not a PyTorch checkpoint"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(tmp / "none.txt")], "input file not found"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(tmp)], "is a folder: name the file of texts"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.csv", "a,b\n1,2\n"))], "no column 'text'"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.jsonl", '{"body": "x"}\n'))], "no field 'text'"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.jsonl", '{"text": "a"}\n{"text": \n'))], "t.jsonl:2: not a JSON line"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.json", '["a",\n "b"'))], "t.json:2: not valid JSON"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.json", '{"text": "a"}\n'))], "t.json: expected a JSON list"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.json", '["a", {"body": "b"}]'))], "t.json: item 1: no field 'text'"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.tsv", "a\tb\n1\t2\n"))], "t.tsv: no column 'text' (columns: a, b)"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_parquet(tmp / "t.parquet", body=["x"], label=[1]))], "t.parquet: no column 'text' (columns: body, label)"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_parquet(tmp / "t.parquet", text=[1, 2]))], "t.parquet: column 'text' holds int64, not strings"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.parquet", "text\nhello\n"))], "t.parquet: not a readable parquet file"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.txt", "x\n")), "--text-field", "review"], "t.txt, read as plain lines"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.log", "x\n")), "--text-field", "text"], "--text-field applies to csv/tsv/jsonl/json/parquet inputs only"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--text-field", "review"], "--text-field applies to csv/tsv/jsonl/json/parquet inputs only, not to plain lines from stdin"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--text-field", "review", "x"], "not to texts given as arguments"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.txt", "x\n")), "y"], "give texts as arguments or --input, not both"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--batch-size", "0", "x"], "batch-size"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--device", "gpu", "x"], "device 'gpu' is not usable here"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--device", "gpu", "--quantize", "x"], "device 'gpu' is not usable"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_gzip(tmp / "t.jsonl.gz", '{"text": "x"}\n'))], "t.jsonl.gz: is gzip-compressed"),
    ],
    ids=[
        "missing-ckpt",
        "bad-ckpt",
        "missing-input",
        "input-folder",
        "csv-column",
        "jsonl-field",
        "jsonl-syntax",
        "json-syntax",
        "json-not-a-list",
        "json-item-field",
        "tsv-column",
        "parquet-column",
        "parquet-not-strings",
        "parquet-invalid",
        "text-field-txt",
        "text-field-other-extension",
        "text-field-stdin",
        "text-field-arguments",
        "arguments-and-input",
        "batch-size",
        "device",
        "device-int8",
        "gzip",
    ],
)
def test_errors_exit_2_with_one_line(tiny_checkpoint, capsys, tmp_path, setup, message):
    code, records, err = run(capsys, setup(tmp_path, tiny_checkpoint))
    assert code == 2 and records == []
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _write(path, content: str):
    path.write_text(content, encoding="utf-8")
    return path


def _gzip(path, content: str):
    path.write_bytes(gzip.compress(content.encode()))
    return path


def _parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def test_a_lone_dash_argument_is_a_text_not_stdin(tiny_checkpoint):
    # As a command runs it, in its own process: "-" given as TEXT is classified; "--input -" reads stdin.
    result = subprocess.run(
        [sys.executable, "-m", "gru_nlp.cli", "classify", "--ckpt", str(tiny_checkpoint), "-"],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    check_records([json.loads(line) for line in result.stdout.splitlines()], ["-"])


def test_sigterm_leaves_the_output_file_as_it_was_and_no_temporary_file(tiny_checkpoint, tmp_path):
    output = _write(tmp_path / "out.jsonl", "the previous predictions\n")
    command = [sys.executable, "-m", "gru_nlp.cli", "classify", "--ckpt", str(tiny_checkpoint), "--output", str(output)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdin.write(b"a bad film\n")
    process.stdin.flush()  # stdin stays open: classify waits for more lines, its temporary file open
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.jsonl.*.tmp")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.jsonl.*.tmp")), "the temporary output file never appeared"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 143, process.stderr.read()
    assert output.read_text() == "the previous predictions\n" and sorted(tmp_path.iterdir()) == [output]


def test_ctrl_c_exits_130_without_a_traceback_and_keeps_the_output(tiny_checkpoint, capsys, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gru_nlp.classify.TextClassifier.predict", interrupted)
    output = _write(tmp_path / "out.jsonl", "the previous predictions\n")
    code, printed, err = run(capsys, ["--ckpt", str(tiny_checkpoint), "--output", str(output), "a bad film"])
    assert code == 130 and printed == [] and err == "gru-nlp classify: interrupted\n"
    assert output.read_text() == "the previous predictions\n" and sorted(tmp_path.iterdir()) == [output]


def test_a_named_pipe_is_read_as_an_input_file(tiny_checkpoint, capsys, tmp_path):
    pipe = tmp_path / "texts"  # as bash's `--input <(...)` gives: /dev/fd/N, a pipe
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text("a bad film\ngood\n"), daemon=True)
    writer.start()
    code, printed, err = run(capsys, ["--ckpt", str(tiny_checkpoint), "--input", str(pipe)])
    writer.join(timeout=60)
    assert code == 0, err
    assert [record["text"] for record in printed] == ["a bad film", "good"]
