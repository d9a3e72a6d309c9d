"""``gru-nlp classify``: texts from arguments, stdin and files, JSON lines out, clean errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from gru_nlp.classify import main


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


@pytest.mark.parametrize(
    "name, content, field",
    [
        ("texts.txt", "a bad film\ngood\n", "text"),
        ("texts.csv", 'id,review\n1,a bad film\n2,"good"\n', "review"),
        ("texts.jsonl", '{"text": "a bad film", "label": "neg"}\n\n{"text": "good"}\n', "text"),
        ("texts.json", '["a bad film", "good"]', "text"),
        ("texts.json", '[{"review": "a bad film"}, {"review": "good", "id": 2}]', "review"),
        ("bom.csv", "\ufefftext,label\na bad film,neg\ngood,pos\n", "text"),
        ("bom.txt", "\ufeffa bad film\ngood\n", "text"),
    ],
    ids=["txt", "csv", "jsonl", "json-strings", "json-objects", "csv-bom", "txt-bom"],
)
def test_texts_from_file_to_output_file(tiny_checkpoint, capsys, tmp_path, name, content, field):
    source = tmp_path / name
    source.write_text(content, encoding="utf-8")
    target = tmp_path / "out" / "predictions.jsonl"
    argv = ["--ckpt", str(tiny_checkpoint), "--input", str(source), "--text-field", field, "--output", str(target)]
    code, printed, _ = run(capsys, argv)
    assert code == 0 and printed == []
    check_records([json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()], ["a bad film", "good"])
    assert [p.name for p in target.parent.iterdir()] == ["predictions.jsonl"]  # no temporary file left


def test_explain_adds_word_weights(tiny_checkpoint, capsys):
    code, records, _ = run(capsys, ["--ckpt", str(tiny_checkpoint), "--explain", "--method", "grad_x_input", "good film"])
    assert code == 0
    explanation = records[0]["explanation"]
    assert explanation["method"] == "grad_x_input" and explanation["words"] == ["good", "film"]
    assert sum(explanation["weights"]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda tmp, ckpt: ["--ckpt", str(tmp / "missing.ckpt"), "x"], "checkpoint not found"),
        (lambda tmp, ckpt: ["--ckpt", str(_write(tmp / "bad.ckpt", "not a checkpoint")), "x"], "not a PyTorch checkpoint"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(tmp / "none.txt")], "input file not found"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.csv", "a,b\n1,2\n"))], "no column 'text'"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.jsonl", '{"body": "x"}\n'))], "no field 'text'"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.jsonl", '{"text": "a"}\n{"text": \n'))], "t.jsonl:2: not a JSON line"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.json", '["a",\n "b"'))], "t.json:2: not valid JSON"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.json", '{"text": "a"}\n'))], "t.json: expected a JSON list"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--input", str(_write(tmp / "t.json", '["a", {"body": "b"}]'))], "t.json: item 1: no field 'text'"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--batch-size", "0", "x"], "batch-size"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--device", "gpu", "x"], "device 'gpu' is not usable here"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--device", "gpu", "--quantize", "x"], "device 'gpu' is not usable"),
    ],
    ids=[
        "missing-ckpt",
        "bad-ckpt",
        "missing-input",
        "csv-column",
        "jsonl-field",
        "jsonl-syntax",
        "json-syntax",
        "json-not-a-list",
        "json-item-field",
        "batch-size",
        "device",
        "device-int8",
    ],
)
def test_errors_exit_2_with_one_line(tiny_checkpoint, capsys, tmp_path, setup, message):
    code, records, err = run(capsys, setup(tmp_path, tiny_checkpoint))
    assert code == 2 and records == []
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _write(path, content: str):
    path.write_text(content, encoding="utf-8")
    return path


def test_real_subprocess(tiny_checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "gru_nlp.cli", "classify", "--ckpt", str(tiny_checkpoint), "-"],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    check_records([json.loads(line) for line in result.stdout.splitlines()], ["-"])
