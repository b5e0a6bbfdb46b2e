"""A corpus of malformed inputs across formats. Each gives exactly one `error:` line naming the file
(and the row and field where there is one), exit code 2, no traceback, and no output_dir; or, for
pairs that are well-formed but unusable, a counted skip."""

import json

import pytest
from conftest import one_error_line

from dpokit.cli import main
from dpokit.data.load import load_pairs
from dpokit.data.tokenize import tokenize_dataset

P, C, R = '"prompt": "Rate it", ', '"chosen": "Great", ', '"rejected": "Bad"'
OK = "{" + P + C + R + "}\n"
MSG = lambda role, content: {"role": role, "content": content}  # noqa: E731


def jsonl(*rows):
    return "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows).encode()


def conv(prompt="Rate it", chosen="Great", rejected="Bad"):
    return {
        "prompt": [MSG("user", prompt)],
        "chosen": [MSG("assistant", chosen)],
        "rejected": [MSG("assistant", rejected)],
    }


def parquet_bytes(rows):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


# name -> (file content, expected text in the one error line)
CORPUS = {
    # JSON lines
    "empty.jsonl": (b"", "empty.jsonl: no rows"),
    "blank-lines.jsonl": (b"\n\n  \n", "blank-lines.jsonl: no rows"),
    "truncated-line.jsonl": (jsonl(OK, '{"prompt": "x", "chosen": "y", "rej\n'), "row 2: malformed JSON"),
    "not-json.jsonl": (b"prompt,chosen,rejected\n", "row 1: malformed JSON"),
    "array-row.jsonl": (jsonl(OK, '["a", "b", "c"]\n'), "row 2: expected a JSON object, got list"),
    "number-row.jsonl": (jsonl(OK, "42\n"), "row 2: expected a JSON object, got int"),
    "broken-utf8.jsonl": (
        OK.encode() + b'{"prompt": "caf\xc3", "chosen": "a", "rejected": "b"}\n',
        "row 2: not valid UTF-8",
    ),
    "missing-rejected.jsonl": (jsonl({"prompt": "p", "chosen": "c"}), "row 1: field 'rejected': missing"),
    "missing-chosen-later.jsonl": (jsonl(OK, OK, {"prompt": "p", "rejected": "r"}), "row 3: field 'chosen': missing"),
    "misspelled-column.jsonl": (
        jsonl({"prompt": "p", "choosen": "c", "rejected": "r"}),
        "row 1: field 'chosen': missing",
    ),
    "null-prompt.jsonl": (
        jsonl(OK, {"prompt": None, "chosen": "c", "rejected": "r"}),
        "row 2: field 'prompt': missing",
    ),
    "empty-chosen.jsonl": (
        jsonl(OK, {"prompt": "p", "chosen": "", "rejected": "r"}),
        "row 2: field 'chosen': empty string",
    ),
    "whitespace-rejected.jsonl": (
        jsonl({"prompt": "p", "chosen": "c", "rejected": " \n\t"}),
        "field 'rejected': empty string",
    ),
    "int-chosen.jsonl": (
        jsonl({"prompt": "p", "chosen": 5, "rejected": "r"}),
        "row 1: field 'chosen': expected a string, got int",
    ),
    "bool-prompt.jsonl": (
        jsonl({"prompt": True, "chosen": "c", "rejected": "r"}),
        "field 'prompt': expected a string, got bool",
    ),
    "dict-rejected.jsonl": (
        jsonl({"prompt": "p", "chosen": "c", "rejected": {"text": "r"}}),
        "field 'rejected': expected a string, got dict",
    ),
    "mixed-formats.jsonl": (
        jsonl(conv(), {"prompt": "p", "chosen": "c", "rejected": "r"}),
        "row 2: field 'prompt': expected a list of messages, got str",
    ),
    "message-no-role.jsonl": (
        jsonl({**conv(), "chosen": [{"content": "c"}]}),
        "field 'chosen': each message needs 'role' and 'content'",
    ),
    "message-int-content.jsonl": (
        jsonl({**conv(), "rejected": [MSG("assistant", 3)]}),
        "field 'rejected': message role and content must be strings",
    ),
    "message-not-dict.jsonl": (
        jsonl({**conv(), "prompt": ["hello"]}),
        "field 'prompt': each message needs 'role' and 'content'",
    ),
    "empty-messages.jsonl": (jsonl({**conv(), "chosen": []}), "field 'chosen': empty list of messages"),
    "all-equal.jsonl": (
        jsonl({"prompt": "p", "chosen": "same", "rejected": "same"}),
        "no usable pairs (0 pairs kept, 1 dropped (1 with chosen equal to rejected))",
    ),
    "all-too-long.jsonl": (jsonl({"prompt": "word " * 400, "chosen": "c", "rejected": "r"}), "no usable pairs"),
    # JSON
    "empty-list.json": (b"[]", "empty-list.json: no rows"),
    "object.json": (b'{"a": 1, "b": 2}', "object.json: expected a JSON list of objects"),
    "scalar.json": (b'"hello"', "scalar.json: expected a JSON list of objects"),
    "malformed.json": (b'[{"prompt": "p",', "malformed.json: malformed JSON"),
    "list-of-strings.json": (b'["a", "b"]', "list-of-strings.json: row 1: expected a JSON object, got str"),
    "missing-field.json": (
        json.dumps([{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}]).encode(),
        "row 2: field 'rejected': missing",
    ),
    # CSV
    "empty.csv": (b"", "empty.csv: no rows"),
    "header-only.csv": (b"prompt,chosen,rejected\n", "header-only.csv: no rows"),
    "empty-cell.csv": (b"prompt,chosen,rejected\np,c,r\np,,r\n", "empty-cell.csv: row 3: field 'chosen': empty string"),
    "short-row.csv": (b"prompt,chosen,rejected\np,c\n", "short-row.csv: row 2: field 'rejected': missing"),
    "extra-cells.csv": (b"prompt,chosen,rejected\np,c,r,x\n", "extra-cells.csv: row 2: more cells than columns"),
    "wrong-header.csv": (b"question,good,bad\np,c,r\n", "wrong-header.csv: row 2: field 'chosen': missing"),
    "broken-utf8.csv": (b"prompt,chosen,rejected\n\xff\xfe,c,r\n", "broken-utf8.csv: not valid UTF-8"),
    # Parquet
    "corrupt.parquet": (b"PAR1 this is not parquet", "corrupt.parquet: cannot read Parquet"),
    "int-column.parquet": (None, "int-column.parquet: row 1: field 'chosen': expected a string, got int"),
    "null-cell.parquet": (None, "null-cell.parquet: row 2: field 'rejected': missing"),
    "missing-column.parquet": (None, "missing-column.parquet: row 1: field 'rejected': missing"),
    "empty.parquet": (None, "empty.parquet: no rows"),
}
PARQUET = {
    "int-column.parquet": [{"prompt": "p", "chosen": 1, "rejected": 2}],
    "null-cell.parquet": [
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": "p", "chosen": "c", "rejected": None},
    ],
    "missing-column.parquet": [{"prompt": "p", "chosen": "c"}],
}


def materialise(tmp_path, name):
    path = tmp_path / name
    content, expected = CORPUS[name]
    if name == "empty.parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.table(
                {
                    "prompt": pa.array([], pa.string()),
                    "chosen": pa.array([], pa.string()),
                    "rejected": pa.array([], pa.string()),
                }
            ),
            path,
        )
    elif content is None:
        path.write_bytes(parquet_bytes(PARQUET[name]))
    else:
        path.write_bytes(content)
    return path, expected


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_input_one_line_error(name, tmp_path, tiny_model_dir, capsys):
    path, expected = materialise(tmp_path, name)
    out = tmp_path / "out"
    code = main(
        [
            "dpo",
            f"model={tiny_model_dir}",
            f"dataset={path}",
            f"output_dir={out}",
            "max_length=64",
            "max_prompt_length=null",
            "max_steps=1",
            "progress_bar=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    one_error_line(err, expected, path)
    assert not out.exists()


def test_unusable_pairs_are_counted_skips(tmp_path, smol_tokenizer):
    """Well-formed but unusable pairs among good ones are dropped and counted, not errors."""
    rows = [
        {"prompt": "Rate it", "chosen": " Great", "rejected": " Bad"},
        {"prompt": "Rate it", "chosen": " Same", "rejected": " Same"},
        {"prompt": "word " * 200_000, "chosen": " c", "rejected": " r"},  # a ~1 MB line
        {"prompt": "Rate it", "chosen": " Fine", "rejected": " Poor"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(jsonl(*rows))
    pairs, label, _ = load_pairs(str(path))
    kept, stats = tokenize_dataset(smol_tokenizer, pairs, label, max_length=64, max_prompt_length=None)
    assert [p.row for p in kept] == [1, 4]
    assert stats.dropped == {"with chosen equal to rejected": 1, "whose response would be empty after truncation": 1}
    kept, stats = tokenize_dataset(smol_tokenizer, pairs, label, max_length=64, max_prompt_length=32)
    assert [p.row for p in kept] == [1, 3, 4]  # with a prompt limit the huge prompt is cut, not dropped
    assert len(kept[1].prompt_ids) == 32
