"""The Arrow data path (data/batched.py, data/arrow.py) against the row-by-row one (tokenize_pair +
truncate, i.e. tokenize_dataset): the same ids for every kept pair, the same dropped counts, on the
bundled data and on boundary cases; the fingerprint cache (a hit tokenizes nothing, any input that
changes the ids is a miss); errors stay one line and write nothing."""

import json

import pytest
from conftest import ROOT, conversational_rows, standard_rows, write_jsonl
from test_tokenize import crossing_tokenizer  # noqa: F401 (a fixture)

from dpokit.data import arrow, batched
from dpokit.data.arrow import PairTable, tokenize_to_table
from dpokit.data.load import InMemory, load_pairs
from dpokit.data.tokenize import tokenize_dataset
from dpokit.errors import UserError

BUNDLED = ROOT / "data" / "sentiment" / "train.jsonl"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenized"


def as_tuples(pairs):
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.row) for p in pairs]


def old_path(tok, source, *limits):
    rows, label, fmt = load_pairs(source)
    pairs, stats = tokenize_dataset(tok, rows, label, *limits)
    return as_tuples(pairs), stats.dropped, fmt


def assert_same(tok, source, *limits, **kw):
    want, dropped, fmt = old_path(tok, source, *limits)
    table, _, got_fmt, stats = tokenize_to_table(tok, source, "train", *limits, **kw)
    assert as_tuples(table) == want and stats.dropped == dropped and got_fmt == fmt
    assert stats.kept == len(table) == len(want)
    return table


@pytest.mark.parametrize("limits", [(None, None, "keep_end"), (48, 20, "keep_end"), (40, 12, "keep_start")])
def test_bundled_data_gives_the_same_ids(smol_tokenizer, limits):
    assert_same(smol_tokenizer, str(BUNDLED), *limits)


HARD_TEXT = [
    {"prompt": "Answer: ", "chosen": "yes", "rejected": "no"},  # a space that merges across the boundary
    {"prompt": "Question: is it good?\n", "chosen": "yes", "rejected": "no way"},
    {"prompt": "Reply:\n", "chosen": "yes indeed", "rejected": "no"},
    {"prompt": "Answer:", "chosen": " no", "rejected": " yes"},  # a clean boundary
    {"prompt": "Same", "chosen": " x", "rejected": " x"},  # dropped: chosen equals rejected
    {"prompt": "Ends in eos", "chosen": " done</s>", "rejected": " not done"},
    {"chosen": "Answer: yes", "rejected": "Answer: no"},  # implicit prompt (the common beginning)
]


@pytest.mark.parametrize("limits", [(None, None, "keep_end"), (6, 3, "keep_end"), (5, 2, "keep_start")])
def test_boundary_cases_crossing_tokenizer(crossing_tokenizer, tmp_path, limits):  # noqa: F811
    """A sentencepiece-style BPE whose merges cross the boundary and which adds its own BOS."""
    rows = [dict(r) for r in HARD_TEXT]
    rows[-1] = {"prompt": "Answer:", "chosen": " yes", "rejected": " no"}  # one format per file
    assert_same(crossing_tokenizer, str(write_jsonl(tmp_path / "t.jsonl", rows)), *limits)
    implicit = [
        {"chosen": "Answer: yes", "rejected": "Answer: no"},
        {"chosen": "Reply:\nyes", "rejected": "Reply:\nno"},
    ]
    assert_same(crossing_tokenizer, str(write_jsonl(tmp_path / "i.jsonl", implicit)), *limits)


def test_boundary_cases_embedded_tokenizer(smol_tokenizer, tmp_path):
    text = [r for r in HARD_TEXT if "prompt" in r] + standard_rows(8)
    text[5] = {"prompt": "Ends in eos", "chosen": " done" + smol_tokenizer.eos_token, "rejected": " not done"}
    assert_same(smol_tokenizer, str(write_jsonl(tmp_path / "s.jsonl", text)), 9, 4, "keep_end")
    chats = conversational_rows(8) + [
        {  # a multi-turn prompt, a system message, and a message with an extra key in one row only
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Rate it \n"},
            ],
            "chosen": [{"role": "assistant", "content": " 5 ", "name": "bot"}],
            "rejected": [{"role": "assistant", "content": "\n1"}],
        }
    ]
    assert_same(smol_tokenizer, str(write_jsonl(tmp_path / "c.jsonl", chats)))
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in chats]
    assert_same(smol_tokenizer, str(write_jsonl(tmp_path / "ic.jsonl", implicit)), 30, 8, "keep_start")


def test_without_the_cache(smol_tokenizer, cache):
    assert_same(smol_tokenizer, str(BUNDLED), 40, 12, "keep_start", use_cache=False)
    assert not cache.exists() or not list(cache.iterdir())


def test_in_memory_sources(smol_tokenizer):
    import datasets

    rows = conversational_rows(8)
    ds = datasets.Dataset.from_list(rows)
    for data in (rows, ds, datasets.DatasetDict({"train": ds})):
        assert_same(smol_tokenizer, InMemory(data, "train_dataset"))


def test_worker_processes_give_the_same_ids_and_errors(smol_tokenizer, tmp_path):
    """num_proc=2: two forked workers, rows split between them; a template error in the second half still
    comes back as the one-line UserError naming its row."""
    rows = conversational_rows(40)
    assert_same(smol_tokenizer, str(write_jsonl(tmp_path / "c.jsonl", rows)), 40, 20, "keep_end", num_proc=2)
    rows[33]["chosen"] = [{"role": "tool", "content": "x"}]  # SmolLM2's template renders it; make it fail
    tok = smol_tokenizer
    real = tok.chat_template
    refuse_tools = "{% if message['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
    loop = "{% for message in messages %}"
    tok.chat_template = real.replace(loop, loop + refuse_tools, 1)
    try:
        assert tok.chat_template != real
        with pytest.raises(UserError, match=r"b.jsonl: row 34: field 'chosen': the chat template failed"):
            tokenize_to_table(tok, str(write_jsonl(tmp_path / "b.jsonl", rows)), num_proc=2)
    finally:
        tok.chat_template = real


def test_second_run_tokenizes_nothing(smol_tokenizer, tmp_path, cache, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", conversational_rows(16))
    first, *_ = tokenize_to_table(smol_tokenizer, str(path), "train", 64, 32, "keep_end")
    assert len(list(cache.iterdir())) == 1
    calls = []
    real = batched.tokenize_rows
    monkeypatch.setattr(arrow, "tokenize_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(arrow, "load_pairs", lambda *a: pytest.fail("a cache hit reads no rows"))
    again, label, fmt, stats = tokenize_to_table(smol_tokenizer, str(path), "train", 64, 32, "keep_end")
    assert as_tuples(again) == as_tuples(first) and calls == [] and stats.kept == 16
    assert label == str(path) and fmt == "conversational"


def test_anything_that_changes_the_ids_is_a_miss(smol_tokenizer, tmp_path, cache):
    path = write_jsonl(tmp_path / "d.jsonl", conversational_rows(8))
    tokenize_to_table(smol_tokenizer, str(path), "train", 64, 32, "keep_end")
    tokenize_to_table(smol_tokenizer, str(path), "train", 63, 32, "keep_end")  # max_length
    tokenize_to_table(smol_tokenizer, str(path), "train", 64, 31, "keep_end")  # max_prompt_length
    tokenize_to_table(smol_tokenizer, str(path), "train", 64, 8, "keep_start")  # truncation_mode
    rows = conversational_rows(8)
    rows[3]["chosen"][0]["content"] += "!"
    write_jsonl(path, rows)  # the file's content
    tokenize_to_table(smol_tokenizer, str(path), "train", 64, 32, "keep_end")
    real = smol_tokenizer.chat_template
    try:
        smol_tokenizer.chat_template = real.replace("<|im_start|>", "<|im_start|> ")
        table, *_ = tokenize_to_table(smol_tokenizer, str(path), "train", 64, 32, "keep_end")  # the template
        want, _, _ = old_path(smol_tokenizer, str(path), 64, 32, "keep_end")
        assert as_tuples(table) == want
    finally:
        smol_tokenizer.chat_template = real
    assert len(list(cache.iterdir())) == 6
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no unfinished directory left


def test_bad_rows_are_one_line_errors_and_write_nothing(smol_tokenizer, tmp_path, cache):
    rows = conversational_rows(6)
    rows[4]["rejected"] = 7
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=r"bad.jsonl: row 5: field 'rejected': expected a list of messages"):
        tokenize_to_table(smol_tokenizer, str(path))
    same = [{"prompt": "p", "chosen": " a", "rejected": " a"}] * 3
    with pytest.raises(UserError, match=r"no usable pairs \(0 pairs kept, 3 dropped"):
        tokenize_to_table(smol_tokenizer, str(write_jsonl(tmp_path / "same.jsonl", same)))
    assert not cache.exists() or not list(cache.iterdir())


def test_pair_table_reads_like_a_list(smol_tokenizer, tmp_path):
    rows = standard_rows(8)
    rows[2] = {"prompt": "p", "chosen": " a", "rejected": " a"}  # dropped: indices skip it
    table, *_ = tokenize_to_table(smol_tokenizer, str(write_jsonl(tmp_path / "s.jsonl", rows)))
    assert isinstance(table, PairTable) and len(table) == 7 and [p.row for p in table] == [1, 2, 4, 5, 6, 7, 8]
    assert as_tuples(table[1:3]) == as_tuples([table[1], table[2]]) and table[-1].row == 8
    prompt, chosen, rejected = table.lengths()
    assert list(prompt) == [len(p.prompt_ids) for p in table] and list(rejected) == [len(p.rejected_ids) for p in table]
    table.set_reference_logps([float(i) for i in range(7)], [-float(i) for i in range(7)])
    assert table[3].reference_logps == (3.0, -3.0)
    with pytest.raises(IndexError):
        table[7]
    assert json.loads((next(iter((tmp_path / "cache" / "tokenized").iterdir())) / "meta.json").read_text())["kept"] == 7


def _rank(rank, world, port, tokenizer_dir, good, bad, cache, out):
    """One torchrun-like rank (gloo): prepare `good` through prepare_once, then `bad`."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DPOKIT_CACHE=cache)
    import torch.distributed as dist

    from dpokit.models import load_tokenizer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = load_tokenizer(tokenizer_dir)
    reads = []
    real = arrow.load_pairs
    arrow.load_pairs = lambda *a: reads.append(1) or real(*a)
    table, *_ = arrow.prepare_once(lambda: arrow.tokenize_to_table(tok, good))
    try:
        arrow.prepare_once(lambda: arrow.tokenize_to_table(tok, bad))
        error = None
    except UserError as e:
        error = str(e)
    result = {"reads": len(reads), "pairs": as_tuples(table), "error": error}
    (out / f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_under_torchrun_rank0_prepares_and_the_others_read_its_cache(tiny_model_dir, tmp_path):
    import socket

    import torch.multiprocessing as mp

    good = write_jsonl(tmp_path / "good.jsonl", conversational_rows(12))
    rows = conversational_rows(4)
    rows[2]["chosen"] = "not a list"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (2, port, str(tiny_model_dir), str(good), str(bad), str(tmp_path / "shared"), tmp_path)
    mp.spawn(_rank, args=args, nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["pairs"] == r1["pairs"] and len(r0["pairs"]) == 12
    assert r0["reads"] == 2 and r1["reads"] == 0  # rank 1 read no rows: the cache (and no bad-file work)
    assert "bad.jsonl: row 3: field 'chosen'" in r0["error"]
    assert r1["error"] == "rank 0 could not prepare the data (its error is above)"
