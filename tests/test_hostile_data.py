"""Hostile data (issue 11): nothing silent, nothing lost.

Bad data of every kind we could think of (format mixes that used to drop prompts silently, parser
tracebacks, corrupt `datasets` directories, chat templates that refuse a row, oversized fields) must
give exactly one short, printable `error:` line naming the file (and the row and field where there is
one), exit code 2, no traceback, no model loaded and no output_dir. Valid input that used to be
rejected or mangled (byte-order marks, U+2028 / U+0085 / form feed in CSV cells, big CSV cells) must
load with its exact text.
"""

import copy
import json
import shutil

import pytest
from conftest import one_error_line

from dpokit.cli import main
from dpokit.data import load
from dpokit.data.load import MAX_FIELD_CHARS, load_pairs, load_unpaired
from dpokit.data.prompts import tokenize_prompt
from dpokit.data.tokenize import common_prefix_text, end_with_one_eos, tokenize_dataset, tokenize_pair
from dpokit.errors import UserError

OK = {"prompt": "Rate it", "chosen": "Great", "rejected": "Bad"}
KTO_OK = [
    {"prompt": "Rate it", "completion": "Great", "label": True},
    {"prompt": "Rate it", "completion": "Bad", "label": False},
]
BIG = 5 * MAX_FIELD_CHARS  # a ~5 MB field: refused at once instead of minutes of tokenizing


def MSG(role, content):
    return {"role": role, "content": content}


def conv(prompt="Rate it", chosen="Great", rejected="Bad"):
    return {
        "prompt": [MSG("user", prompt)],
        "chosen": [MSG("assistant", chosen)],
        "rejected": [MSG("assistant", rejected)],
    }


def jsonl(*rows) -> bytes:
    return "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows).encode()


def parquet(table_of):
    """A maker writing the pyarrow table `table_of(pa)` as Parquet."""

    def make(path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(table_of(pa), path)

    return make


def saved_dataset(damage, splits=False):
    """A maker: `datasets.save_to_disk` of three good rows (a DatasetDict with a train split when
    `splits`), then `damage(directory)`."""

    def make(path):
        import datasets

        ds = datasets.Dataset.from_list([OK] * 3)
        (datasets.DatasetDict({"train": ds}) if splits else ds).save_to_disk(str(path))
        damage(path)

    return make


def _rewrite_arrow(fn):
    def damage(path):
        for f in path.rglob("*.arrow"):
            fn(f)

    return damage


def _write(name, text):
    def damage(path):
        (path / name).write_text(text)

    return damage


def _remove(name):
    def damage(path):
        target = path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return damage


# name -> (file content, or a maker writing it at the path; text expected in the one error line).
# Names starting with "kto-" run with loss_type=kto (load_unpaired).
CORPUS = {
    # -- silent data loss: the format is decided by every row, not the first ------------------------
    "implicit-first-row.jsonl": (
        jsonl({"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}, OK, OK),
        "row 1: field 'prompt': missing",
    ),
    "implicit-later-row.jsonl": (
        jsonl(OK, OK, {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}),
        "row 3: field 'prompt': missing",
    ),
    "implicit-first-row.json": (
        json.dumps([{"chosen": "Q: a", "rejected": "Q: b"}, OK]).encode(),
        "row 1: field 'prompt': missing",
    ),
    "implicit-first-conv.jsonl": (
        jsonl(
            {
                "chosen": [MSG("user", "hi"), MSG("assistant", "yes")],
                "rejected": [MSG("user", "hi"), MSG("assistant", "no")],
            },
            conv(),
        ),
        "row 1: field 'prompt': missing",
    ),
    "standard-then-conv-chosen.jsonl": (
        jsonl(OK, {**OK, "chosen": [MSG("assistant", "c")]}),
        "row 2: field 'chosen': expected a string, got list",
    ),
    "capital-prompt-column.jsonl": (
        jsonl({"Prompt": "Rate it", "chosen": "A: good", "rejected": "A: bad"}),
        "row 1: field 'prompt': missing (found 'Prompt'",
    ),
    "spaced-header.csv": (b"prompt, chosen, rejected\np,c,r\n", "row 2: field 'chosen': missing (found ' chosen'"),
    "semicolons.csv": (b"prompt;chosen;rejected\np;c;r\n", "row 2: field 'chosen': missing"),
    # implicit prompts: chosen and rejected must start with a common prompt
    "implicit-no-common-text.jsonl": (
        jsonl({"chosen": "Hello", "rejected": "World"}),
        "row 1: field 'chosen': no prompt",
    ),
    "implicit-space-prefix.jsonl": (
        jsonl({"chosen": "Q: x A: y", "rejected": "Q: x A: z"}, {"chosen": " yes", "rejected": " no"}),
        "row 2: field 'chosen': no prompt",
    ),
    "implicit-no-common-messages.jsonl": (
        jsonl(
            {"chosen": [MSG("user", "a"), MSG("assistant", "x")], "rejected": [MSG("user", "b"), MSG("assistant", "y")]}
        ),
        "row 1: field 'chosen': no prompt",
    ),
    "implicit-single-message.jsonl": (
        jsonl({"chosen": [MSG("assistant", "x")], "rejected": [MSG("assistant", "y")]}),
        "row 1: field 'chosen': no prompt",
    ),
    "kto-no-prompt-first.jsonl": (jsonl({"completion": "c", "label": True}, *KTO_OK), "row 1: field 'prompt': missing"),
    "kto-mixed-kinds.jsonl": (
        jsonl(KTO_OK[0], {"prompt": [MSG("user", "p")], "completion": [MSG("assistant", "c")], "label": False}),
        "row 2: field 'prompt': expected a string, got list",
    ),
    # -- JSON parser tracebacks -----------------------------------------------------------------------
    "deep-nesting.jsonl": (jsonl(OK, "[" * 100_000 + "]" * 100_000 + "\n"), "row 2: JSON nested too deeply"),
    "deep-in-field.jsonl": (
        jsonl('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "c", "rejected": "r"}\n'),
        "row 1: JSON nested too deeply",
    ),
    "deep-nesting.json": (b"[" * 100_000 + b"]" * 100_000, "deep-nesting.json: JSON nested too deeply"),
    "huge-int.jsonl": (
        jsonl(OK, '{"prompt": ' + "9" * 5000 + ', "chosen": "c", "rejected": "r"}\n'),
        "row 2: malformed JSON (an integer with more than",
    ),
    "huge-int.json": (
        ('[{"prompt": "p", "chosen": ' + "1" * 5000 + ', "rejected": "r"}]').encode(),
        "huge-int.json: malformed JSON (an integer with more than",
    ),
    "kto-huge-int-label.jsonl": (
        jsonl(KTO_OK[0], '{"prompt": "p", "completion": "c", "label": ' + "1" * 5000 + "}\n"),
        "row 2: malformed JSON (an integer with more than",
    ),
    "two-lists.json": (
        json.dumps({"train": [OK], "test": [OK]}).encode(),
        "two-lists.json: expected a JSON list of objects (or an object holding one list; this one holds 2)",
    ),
    "raw-control-char.jsonl": (b'{"prompt": "a\tb", "chosen": "c", "rejected": "r"}\n', "row 1: malformed JSON"),
    "nan-prompt.jsonl": (
        b'{"prompt": NaN, "chosen": "c", "rejected": "r"}\n',
        "row 1: field 'prompt': expected a string, got float",
    ),
    "zero-filled-tail.jsonl": (jsonl(OK) + b"\x00" * 512 + b"\n", "row 2: malformed JSON"),
    "bom-then-list.jsonl": ("\ufeff[1, 2]\n".encode(), "row 1: expected a JSON object, got list"),
    # -- lone surrogates (valid JSON escapes, not characters: the tokenizer cannot encode them) --------
    "surrogate-prompt.jsonl": (
        b'{"prompt": "caf\\ud800", "chosen": "c", "rejected": "r"}\n',
        "row 1: field 'prompt': contains a lone surrogate",
    ),
    "surrogate-rejected.json": (
        b'[{"prompt": "p", "chosen": "c", "rejected": "r\\udfff"}]',
        "row 1: field 'rejected': contains a lone surrogate",
    ),
    "surrogate-message.jsonl": (
        jsonl(
            conv(),
            '{"prompt": [{"role": "user", "content": "\\udc00"}], '
            '"chosen": [{"role": "assistant", "content": "c"}], '
            '"rejected": [{"role": "assistant", "content": "r"}]}\n',
        ),
        "row 2: field 'prompt': contains a lone surrogate",
    ),
    "surrogate-role.jsonl": (
        (
            b'{"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "\\ud83d", '
            b'"content": "c"}], "rejected": [{"role": "assistant", "content": "r"}]}\n'
        ),
        "row 1: field 'chosen': contains a lone surrogate",
    ),
    "kto-surrogate-completion.jsonl": (
        jsonl(KTO_OK[0], '{"prompt": "p", "completion": "\\udbff", "label": false}\n'),
        "row 2: field 'completion': contains a lone surrogate",
    ),
    # the error line itself must stay one printable line whatever the column names hold
    "surrogate-key.jsonl": (b'{"\\udc80": 1}\n', "row 1: field 'chosen': missing"),
    "newline-in-key.jsonl": (b'{"a\\nerror: injected": 1}\n', "row 1: field 'chosen': missing"),
    "kto-long-label.jsonl": (
        jsonl(KTO_OK[0], {"prompt": "p", "completion": "c", "label": "x" * 100_000}),
        "row 2: field 'label': expected true or false",
    ),
    # -- encodings and byte-order marks ---------------------------------------------------------------
    "bom-only.jsonl": ("\ufeff".encode(), "bom-only.jsonl: no rows"),
    "bom-only.json": ("\ufeff".encode(), "bom-only.json: no rows"),
    "bom-only.csv": ("\ufeff".encode(), "bom-only.csv: no rows"),
    "bom-header-only.csv": ("\ufeffprompt,chosen,rejected\r\n".encode(), "bom-header-only.csv: no rows"),
    "utf16.csv": ("prompt,chosen,rejected\np,c,r\n".encode("utf-16"), "utf16.csv: not valid UTF-8"),
    "utf16.jsonl": (json.dumps(OK).encode("utf-16"), "utf16.jsonl: row 1: not valid UTF-8"),
    # -- CSV ------------------------------------------------------------------------------------------
    "duplicate-header.csv": (
        b"prompt,chosen,prompt,rejected\np,c,q,r\n",
        "row 1: field 'prompt': column named twice in the header",
    ),
    "kto-duplicate-label.csv": (
        b"prompt,completion,label,label\np,c,true,false\np,d,false,true\n",
        "row 1: field 'label': column named twice in the header",
    ),
    "empty-header-line.csv": (b"\nprompt,chosen,rejected\np,c,r\n", "row 1: the header line is empty"),
    "unterminated-quote.csv": (
        b'prompt,chosen,rejected\np,c,r\np,c,"r never closed\np,c,r\np,c,r\n',
        "row 3: malformed CSV (unexpected end of data",
    ),
    "text-after-quote.csv": (b'prompt,chosen,rejected\n"p"x,c,r\n', "row 2: malformed CSV"),
    "huge-cell.csv": (
        b"prompt,chosen,rejected\np,c,r\n" + b"x" * BIG + b",c,r\n",
        f"row 3: field 'prompt': {BIG:,} characters, over the limit",
    ),
    # -- oversized fields: refused before any tokenizing ----------------------------------------------
    "huge-prompt.jsonl": (jsonl(OK, {**OK, "prompt": "x" * BIG}), f"row 2: field 'prompt': {BIG:,} characters"),
    "huge-words.json": (
        json.dumps([{**OK, "rejected": "word " * (BIG // 5)}]).encode(),
        f"row 1: field 'rejected': {BIG:,} characters",
    ),
    "huge-message.jsonl": (jsonl(conv(chosen="y" * BIG)), "row 1: field 'chosen': 5,000,009 characters"),
    "many-messages.jsonl": (
        jsonl({**conv(), "prompt": [MSG("user", "")] * 200_000}),
        "row 1: field 'prompt': 200,000 messages, over the limit of 10,000",
    ),
    "kto-huge-completion.jsonl": (
        jsonl(KTO_OK[0], {**KTO_OK[1], "completion": "z" * BIG}),
        "row 2: field 'completion': 5,000,000 characters",
    ),
    # -- Parquet --------------------------------------------------------------------------------------
    "timestamp-overflow.parquet": (
        parquet(
            lambda pa: pa.table({"prompt": pa.array([10**15], pa.timestamp("ms")), "chosen": ["c"], "rejected": ["r"]})
        ),
        "timestamp-overflow.parquet: cannot read Parquet",
    ),
    "duration-overflow.parquet": (
        parquet(
            lambda pa: pa.table({"prompt": pa.array([10**18], pa.duration("s")), "chosen": ["c"], "rejected": ["r"]})
        ),
        "duration-overflow.parquet: cannot read Parquet",
    ),
    "list-of-strings.parquet": (
        parquet(lambda pa: pa.table({"prompt": [["a", "b"]], "chosen": [["c"]], "rejected": [["r"]]})),
        "row 1: field 'prompt': each message needs 'role' and 'content'",
    ),
    "list-of-ints.parquet": (
        parquet(lambda pa: pa.table({"prompt": [[1]], "chosen": [[2]], "rejected": [[3]]})),
        "row 1: field 'prompt': each message needs 'role' and 'content'",
    ),
    "binary-column.parquet": (
        parquet(lambda pa: pa.table({"prompt": pa.array([b"p"], pa.binary()), "chosen": ["c"], "rejected": ["r"]})),
        "row 1: field 'prompt': expected a string, got bytes",
    ),
    "duplicate-columns.parquet": (
        parquet(
            lambda pa: pa.Table.from_arrays(
                [pa.array(["p"]), pa.array(["q"]), pa.array(["c"]), pa.array(["r"])],
                names=["prompt", "prompt", "chosen", "rejected"],
            )
        ),
        "duplicate-columns.parquet: cannot read Parquet",
    ),
    "implicit-mixed.parquet": (
        parquet(lambda pa: pa.table({"prompt": [None, "p"], "chosen": ["Q: a", "c"], "rejected": ["Q: b", "r"]})),
        "row 1: field 'prompt': missing",
    ),
    # -- corrupt `datasets` directories ---------------------------------------------------------------
    "saved-arrow-missing": (saved_dataset(_rewrite_arrow(lambda f: f.unlink())), "cannot load saved dataset"),
    "saved-arrow-garbage": (
        saved_dataset(_rewrite_arrow(lambda f: f.write_bytes(b"garbage"))),
        "cannot load saved dataset",
    ),
    "saved-arrow-truncated": (
        saved_dataset(_rewrite_arrow(lambda f: f.write_bytes(f.read_bytes()[:200]))),
        "cannot load saved dataset",
    ),
    "saved-bad-info": (saved_dataset(_write("dataset_info.json", "{not json")), "cannot load saved dataset"),
    "saved-bad-state": (saved_dataset(_write("state.json", "{not json")), "cannot load saved dataset"),
    "saved-no-state": (saved_dataset(_remove("state.json")), "cannot load saved dataset"),
    "saved-bad-dict": (
        saved_dataset(_write("dataset_dict.json", "{not json"), splits=True),
        "cannot load saved dataset",
    ),
    "saved-dict-is-list": (
        saved_dataset(_write("dataset_dict.json", "[1, 2]"), splits=True),
        "cannot load saved dataset",
    ),
    "saved-dict-split-gone": (saved_dataset(_remove("train"), splits=True), "cannot load saved dataset"),
    "saved-dict-arrow-garbage": (
        saved_dataset(_rewrite_arrow(lambda f: f.write_bytes(b"\0" * 64)), splits=True),
        "cannot load saved dataset",
    ),
}


def materialise(tmp_path, name):
    content, expected = CORPUS[name]
    path = tmp_path / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    return path, expected


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def assert_one_error(code, err, expected, path, out):
    assert code == 2, err
    line = one_error_line(err, expected, path)
    assert len(line) < 600, line  # short: no field text or column list dumped into it
    line.encode("utf-8")  # printable on a UTF-8 terminal (no lone surrogates)
    assert not out.exists()


@pytest.fixture
def no_model(monkeypatch):
    """Data errors must come before any model is loaded."""
    from dpokit import models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(models, "load_model", refuse)


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 45


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_data_one_line_error(name, tmp_path, tiny_model_dir, capsys, no_model):
    path, expected = materialise(tmp_path, name)
    out = tmp_path / "out"
    kto = ["loss_type=kto", "per_device_train_batch_size=2"] if name.startswith("kto-") else []
    code, err = run_cli(
        [
            "dpo",
            f"model={tiny_model_dir}",
            f"dataset={path}",
            f"output_dir={out}",
            "max_length=64",
            "max_prompt_length=null",
            "max_steps=1",
            "progress_bar=false",
            *kto,
        ],
        capsys,
    )
    assert_one_error(code, err, expected, path, out)


# -- chat templates that refuse or garble a row ---------------------------------------------------------

RAISING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def raising_template_model(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer with a chat template that raises on a 'tool' message (no weights:
    the data must fail before they would be loaded)."""
    d = tmp_path_factory.mktemp("raising-template")
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    (d / "chat_template.jinja").write_text(RAISING_TEMPLATE)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


TEMPLATE_CASES = {
    "template-raises-prompt.jsonl": (
        jsonl(conv(), {**conv(), "prompt": [MSG("tool", "x")]}),
        "row 2: field 'prompt': the chat template failed",
    ),
    "template-raises-rejected.jsonl": (
        jsonl({**conv(), "rejected": [MSG("tool", "x")]}),
        "row 1: field 'rejected': the chat template failed",
    ),
    "kto-template-raises-completion.jsonl": (
        jsonl(
            {"prompt": [MSG("user", "p")], "completion": [MSG("assistant", "c")], "label": True},
            {"prompt": [MSG("user", "p")], "completion": [MSG("tool", "c")], "label": False},
        ),
        "row 2: field 'completion': the chat template failed",
    ),
    "template-not-prefix.jsonl": (
        jsonl({"prompt": [MSG("user", "p")], "chosen": [MSG("user", "c")], "rejected": [MSG("assistant", "r")]}),
        "row 1: field 'chosen': the chat template does not render the prompt as a prefix",
    ),
}


@pytest.mark.parametrize("name", sorted(TEMPLATE_CASES))
def test_template_errors_name_row_and_field(name, tmp_path, raising_template_model, capsys, no_model):
    content, expected = TEMPLATE_CASES[name]
    path, out = tmp_path / name, tmp_path / "out"
    path.write_bytes(content)
    kto = ["loss_type=kto", "per_device_train_batch_size=2"] if name.startswith("kto-") else []
    code, err = run_cli(
        [
            "dpo",
            f"model={raising_template_model}",
            f"dataset={path}",
            f"output_dir={out}",
            "max_length=64",
            "progress_bar=false",
            *kto,
        ],
        capsys,
    )
    assert_one_error(code, err, expected, path, out)


def test_tokenize_prompt_names_row_on_template_error(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = "{{ raise_exception('refused') }}"
    with pytest.raises(UserError, match=r"^d.jsonl: row 7: field 'prompt': the chat template failed \(.*refused"):
        tokenize_prompt(tok, [MSG("user", "hi")], "d.jsonl", 7)
    with pytest.raises(UserError, match=r"^d.jsonl: row 3: field 'prompt': the chat template failed"):
        tokenize_pair(tok, conv(), "d.jsonl", 3)


def test_implicit_messages_without_common_prefix_in_tokenize(smol_tokenizer):
    """Rows that skipped load_pairs' check still get a row/field error, not a template traceback."""
    row = {"chosen": [MSG("user", "a"), MSG("assistant", "x")], "rejected": [MSG("user", "b"), MSG("assistant", "y")]}
    with pytest.raises(UserError, match=r"^d.jsonl: row 4: field 'chosen': no prompt"):
        tokenize_pair(smol_tokenizer, row, "d.jsonl", 4)


# -- valid input that was rejected or mangled ------------------------------------------------------------


def _csv(tmp_path, text, name="d.csv", bom=False):
    path = tmp_path / name
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return str(path)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_bom_csv_keeps_its_prompt_column(tmp_path, newline):
    text = newline.join(["prompt,chosen,rejected", "Rate it,Great,Bad", "Rate that,Fine,Poor", ""])
    rows, _, fmt = load_pairs(_csv(tmp_path, text, bom=True))
    assert fmt == "standard"
    assert rows == [(2, OK), (3, {"prompt": "Rate that", "chosen": "Fine", "rejected": "Poor"})]


def test_bom_jsonl_and_json_load(tmp_path):
    (tmp_path / "d.jsonl").write_bytes("\ufeff".encode() + jsonl(OK, OK))
    (tmp_path / "d.json").write_bytes("\ufeff".encode() + json.dumps([OK, OK]).encode())
    for name in ("d.jsonl", "d.json"):
        rows, _, fmt = load_pairs(str(tmp_path / name))
        assert fmt == "standard" and rows == [(1, OK), (2, OK)], name


def test_bom_csv_for_kto(tmp_path):
    text = "prompt,completion,label\r\nRate it,Great,true\r\nRate it,Bad,false\r\n"
    rows, _, fmt = load_unpaired(_csv(tmp_path, text, bom=True))
    assert fmt == "standard"
    assert [r for _, r in rows] == KTO_OK


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1e"])
def test_csv_cells_keep_unicode_line_separators(tmp_path, char):
    """Only \\n, \\r\\n and \\r end a CSV record; other Unicode line breaks are cell text."""
    text = (
        f"prompt,chosen,rejected\n"
        f"Rate{char}it,Great{char},Bad\n"  # unquoted
        f'"Rate{char}that","x\ny{char}",Poor\n'  # quoted, spanning two lines
        f"last,one,row\n"
    )
    rows, _, _ = load_pairs(_csv(tmp_path, text))
    assert rows == [
        (2, {"prompt": f"Rate{char}it", "chosen": f"Great{char}", "rejected": "Bad"}),
        (3, {"prompt": f"Rate{char}that", "chosen": f"x\ny{char}", "rejected": "Poor"}),
        (5, {"prompt": "last", "chosen": "one", "rejected": "row"}),
    ]  # the line a user sees


def test_csv_rows_keep_their_line_numbers(tmp_path):
    text = 'prompt,chosen,rejected\r\n"a\r\nb",c,r\r\n\r\np,"c\nc",\n'
    with pytest.raises(UserError, match=r"d.csv: row 5: field 'rejected': empty string"):
        load_pairs(_csv(tmp_path, text))


def test_csv_cells_beyond_the_csv_module_default_limit(tmp_path):
    """131,072 characters is csv's own limit, not ours: a 200,000-character cell loads."""
    rows, _, _ = load_pairs(_csv(tmp_path, "prompt,chosen,rejected\n" + "w " * 100_000 + ",c,r\n"))
    assert len(rows[0][1]["prompt"]) == 200_000
    import csv

    assert csv.field_size_limit() == 131072  # and the process-wide limit is left as it was


def test_csv_unnamed_columns_are_ignored(tmp_path):
    """pandas writes its index under an empty header name; the named columns still load."""
    rows, _, _ = load_pairs(_csv(tmp_path, ",prompt,chosen,rejected\n0,Rate it,Great,Bad\n"))
    assert rows == [(2, OK)]


def test_field_of_exactly_the_limit_loads(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(jsonl({**OK, "prompt": "x" * MAX_FIELD_CHARS}))
    rows, _, _ = load_pairs(str(tmp_path / "d.jsonl"))
    assert len(rows[0][1]["prompt"]) == MAX_FIELD_CHARS
    with pytest.raises(UserError, match="over the limit"):
        load.check_field("d", 1, "prompt", "x" * (MAX_FIELD_CHARS + 1), "str")
    load.check_field("d", 1, "prompt", [MSG("user", "")] * load.MAX_FIELD_MESSAGES, "messages")
    with pytest.raises(UserError, match=r"d: row 1: field 'prompt': 10,001 messages, over the limit"):
        load.check_field("d", 1, "prompt", [MSG("user", "")] * (load.MAX_FIELD_MESSAGES + 1), "messages")


def test_implicit_prompt_rows_still_load(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(
        jsonl(
            {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"},
            {"chosen": "Q: x A: same", "rejected": "Q: x A: same and more"},
        )
    )
    rows, _, fmt = load_pairs(str(tmp_path / "d.jsonl"))
    assert fmt == "standard+implicit_prompt" and len(rows) == 2


# -- the linear-time helpers give what the obvious quadratic loops gave -----------------------------------


def _naive_common_prefix_text(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n < min(len(a), len(b)):
        while n > 0 and not a[n - 1].isspace():
            n -= 1
    return n


def _naive_end_with_one_eos(ids, eos):
    if eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        ids = ids[: last + 1]
        while len(ids) >= 2 and ids[-2] == eos:
            ids = ids[:-1]
        return ids
    return ids + [eos]


def test_common_prefix_text_matches_the_character_loop():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        a = "".join(rng.choice("ab \n") for _ in range(rng.randrange(12)))
        b = a[: rng.randrange(len(a) + 1)] + "".join(rng.choice("ab \n") for _ in range(rng.randrange(6)))
        assert common_prefix_text(a, b) == _naive_common_prefix_text(a, b), (a, b)


def test_end_with_one_eos_matches_the_loop():
    import random

    rng = random.Random(1)
    for _ in range(2000):
        ids = [rng.choice([1, 2, 7, 9]) for _ in range(rng.randrange(10))]
        assert end_with_one_eos(_Tok(2), ids) == _naive_end_with_one_eos(ids, 2), ids


class _Tok:
    def __init__(self, eos):
        self.eos_token_id = eos


def test_runs_of_special_tokens_stay_fast(smol_tokenizer):
    """A response of 50,000 EOS tokens and a prompt of 50,000 BOS tokens used to cost quadratic time."""
    tok = smol_tokenizer
    pair = tokenize_pair(tok, {"prompt": tok.bos_token * 50_000, "chosen": tok.eos_token * 50_000, "rejected": "r"})
    assert pair.chosen_ids == [tok.eos_token_id]
    assert pair.prompt_ids.count(tok.bos_token_id) >= 1


def test_big_row_is_cut_to_the_same_ids_as_a_small_one(smol_tokenizer):
    """A field near the size limit tokenizes and truncates like any other row."""
    rows = [(1, {"prompt": "Rate it", "chosen": " great " * 140_000, "rejected": " bad"})]
    kept, _ = tokenize_dataset(smol_tokenizer, rows, "d", max_length=16, max_prompt_length=8)
    small, _ = tokenize_dataset(
        smol_tokenizer,
        [(1, {"prompt": "Rate it", "chosen": " great " * 20, "rejected": " bad"})],
        "d",
        max_length=16,
        max_prompt_length=8,
    )
    assert kept[0].chosen_ids == small[0].chosen_ids and kept[0].prompt_ids == small[0].prompt_ids
