"""Reading every supported source, and a one-line error naming file, row and field for bad input."""

import json

import pytest
from conftest import conversational_rows, standard_rows, write_jsonl

from dpokit.data.load import load_pairs
from dpokit.errors import UserError


def write_all_formats(tmp_path, rows):
    import pandas as pd

    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(rows))
    paths["parquet"] = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(paths["parquet"])
    return paths


def test_every_file_format_reads_the_same_rows(tmp_path):
    rows = standard_rows(5)
    paths = write_all_formats(tmp_path, rows)
    import csv

    paths["csv"] = tmp_path / "d.csv"
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(rows)
    for kind, path in paths.items():
        got, label, fmt = load_pairs(str(path))
        assert [r for _, r in got] == rows, kind
        assert fmt == "standard" and label == str(path)


def test_conversational_parquet_and_datasets_dir(tmp_path):
    import datasets

    rows = conversational_rows(4)
    got, _, fmt = load_pairs(str(write_all_formats(tmp_path, rows)["parquet"]))
    assert fmt == "conversational" and [r for _, r in got] == rows
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])})
    dd.save_to_disk(tmp_path / "saved")
    got, label, _ = load_pairs(str(tmp_path / "saved"), "test")
    assert len(got) == 2 and "test" in label


def test_implicit_prompt_format(tmp_path):
    rows = [{"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}]
    _, _, fmt = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert fmt == "standard+implicit_prompt"


def test_folder_of_split_files(pref_dir):
    train, label, _ = load_pairs(str(pref_dir), "train")
    test, _, _ = load_pairs(str(pref_dir), "test")
    assert (len(train), len(test)) == (16, 8) and label.endswith("train.jsonl")


GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


@pytest.mark.parametrize(
    "lines,expected",
    [
        ([GOOD, {"prompt": "p", "chosen": "c"}], "row 2: field 'rejected': missing"),
        ([GOOD, {**GOOD, "chosen": ""}], "row 2: field 'chosen': empty string"),
        ([GOOD, {**GOOD, "chosen": "   "}], "row 2: field 'chosen': empty string"),
        ([GOOD, {**GOOD, "prompt": 3}], "row 2: field 'prompt': expected a string, got int"),
        ([GOOD, {**GOOD, "rejected": None}], "row 2: field 'rejected': missing"),
        (
            [
                {
                    "prompt": [{"role": "user", "content": "p"}],
                    "chosen": [{"role": "assistant", "content": "c"}],
                    "rejected": [{"role": "assistant"}],
                }
            ],
            "row 1: field 'rejected': each message needs 'role' and 'content'",
        ),
        (
            [
                {
                    "prompt": [],
                    "chosen": [{"role": "assistant", "content": "c"}],
                    "rejected": [{"role": "assistant", "content": "r"}],
                }
            ],
            "row 1: field 'prompt': empty list of messages",
        ),
        ([{"text": "x"}], "row 1: field 'chosen': missing"),
        (
            [{"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}],
            "row 1: field 'prompt': expected a list of messages, got str",
        ),
    ],
)
def test_bad_rows(tmp_path, lines, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UserError, match=expected) as e:
        load_pairs(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"", "no rows"),
        (b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": \n', "row 2: malformed JSON"),
        (b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n[1, 2]\n', "row 2: expected a JSON object"),
        (b'{"prompt": "p\xff", "chosen": "c", "rejected": "r"}\n', "row 1: not valid UTF-8"),
    ],
)
def test_bad_files(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        load_pairs(str(path))


def test_bad_csv_and_json(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,chosen,rejected\np,c,r\np,c,r,extra\n")
    with pytest.raises(UserError, match="a.csv: row 3: more cells"):
        load_pairs(str(tmp_path / "a.csv"))
    (tmp_path / "b.csv").write_text("prompt,chosen,rejected\np,,r\n")
    with pytest.raises(UserError, match="b.csv: row 2: field 'chosen': empty string"):
        load_pairs(str(tmp_path / "b.csv"))
    (tmp_path / "c.json").write_text('{"prompt": ')
    with pytest.raises(UserError, match="c.json: malformed JSON"):
        load_pairs(str(tmp_path / "c.json"))
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="d.parquet: cannot read Parquet"):
        load_pairs(str(tmp_path / "d.parquet"))
    with pytest.raises(UserError, match="nope.jsonl: file not found"):
        load_pairs(str(tmp_path / "nope.jsonl"))
