"""Ranked lists (data/rankings.py, train/ranking_step.py): reading and checking rows, tokenization equal to
the pairs' response by response, every layout (prefix sharing over K responses, packing, chunked
log-probs) equal to the padded one in log-probs, loss and gradients, K = 2 equal to DPO on pairs, and
training end to end from the CLI."""

import json

import pytest
import torch
from conftest import one_error_line, write_jsonl
from test_layouts import VOCAB, tiny_llama

from dpokit.cli import main
from dpokit.commands.dpo import DPOConfig
from dpokit.data.layouts import LAYOUTS, collate_for, prefix_shared_mask
from dpokit.data.rankings import (
    TokenizedRanking,
    collate_rankings,
    load_rankings,
    split_into_pairs,
    tokenize_rankings,
)
from dpokit.data.tokenize import tokenize_pair
from dpokit.errors import UserError
from dpokit.logprobs import sequence_logps
from dpokit.models import load_model
from dpokit.train.dpo_step import DPOStep
from dpokit.train.ranking_step import RankingStep

FILMS = ["Iron Tide", "Glass Harbor", "Quiet Orbit", "Red Meadow", "Night Circus", "Salt Road"]
OPINIONS = ["A stunning, joyful triumph.", "Pleasant enough.", "It was fine, I guess.", "A dull and tedious mess."]


def ranked_rows(n=6, conversational=False, scores=False):
    """Lists of 2 to 4 reviews, best first in the ranking but shuffled in the row."""
    rows = []
    for i in range(n):
        k = 2 + i % 3
        order = [(j + i) % k for j in range(k)]  # row position -> quality (0 = best)
        completions = [OPINIONS[q] for q in order]
        prompt = f"Review the film '{FILMS[i % len(FILMS)]}'."
        if conversational:
            prompt = [{"role": "user", "content": prompt}]
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        row = {"prompt": prompt, "completions": completions}
        row.update({"scores": [10.0 - q for q in order]} if scores else {"ranks": [q + 1 for q in order]})
        rows.append(row)
    return rows


# --- reading and tokenizing ------------------------------------------------------------------------------


def test_load_ranks_scores_ties(tmp_path):
    rows = [
        {"prompt": "p", "completions": ["a", "b", "c"], "ranks": [2, 1, 3]},
        {"prompt": "q", "completions": ["a", "b", "c", "d"], "scores": [0.5, 2.0, 0.5, -1]},  # a tie
        {"prompt": "r", "completions": ["a", "b"], "ranks": [5, 9]},  # any integers: only the order counts
    ]
    got, label, fmt = load_rankings(str(write_jsonl(tmp_path / "r.jsonl", rows)))
    assert fmt == "standard" and label.endswith("r.jsonl")
    assert [r["ranks"] for _, r in got] == [[1, 0, 2], [1, 0, 1, 2], [0, 1]]
    conv, _, fmt = load_rankings(str(write_jsonl(tmp_path / "c.jsonl", ranked_rows(3, conversational=True))))
    assert fmt == "conversational" and len(conv[2][1]["completions"]) == 4


BAD = [
    ({"prompt": "p", "completions": ["a"], "ranks": [1]}, "completions", "at least 2"),
    ({"prompt": "p", "completions": "a b", "ranks": [1]}, "completions", "at least 2"),
    ({"prompt": "p", "completions": ["a", ""], "ranks": [1, 2]}, "completions[1]", "empty string"),
    ({"prompt": "p", "completions": ["a", 3], "ranks": [1, 2]}, "completions[1]", "expected a string"),
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [1]}, "ranks", "1 values for 2 completions"),
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [1, 1.5]}, "ranks", "integers"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1, None]}, "scores", "numbers"),
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [1, 2], "scores": [1, 2]}, "scores", "not both"),
    ({"prompt": "p", "completions": ["a", "b"]}, "ranks", "missing"),
    ({"completions": ["a", "b"], "ranks": [1, 2]}, "prompt", "missing"),
    (
        {"prompt": "p", "completions": [[{"role": "assistant", "content": "a"}], "b"], "ranks": [1, 2]},
        "completions[0]",
        "expected a string",
    ),  # noqa: E501
]


@pytest.mark.parametrize("bad,field,what", BAD)
def test_bad_rows_name_file_row_field(tmp_path, bad, field, what):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "completions": ["x", "y"], "ranks": [1, 2]}, bad])
    with pytest.raises(UserError) as e:
        load_rankings(str(path))
    assert f"{path}: row 2: field '{field}'" in str(e.value) and what in str(e.value)


def test_bad_row_from_the_cli_is_one_error_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "completions": ["x", "y"], "ranks": [1, "2"]}])
    code = main(["dpo", f"dataset={path}", "loss_type=plackett_luce", f"output_dir={tmp_path / 'out'}"])
    assert code == 2
    one_error_line(capsys.readouterr().err, str(path), "row 1", "field 'ranks'", "integers")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("conversational", [False, True])
def test_tokenization_is_the_pairs_response_by_response(smol_tokenizer, conversational):
    rows = [(i + 1, r) for i, r in enumerate(ranked_rows(6, conversational))]
    checked = [(row, {**r, "ranks": [q - 1 for q in r["ranks"]]}) for row, r in rows]
    got, stats = tokenize_rankings(smol_tokenizer, checked, "rows")
    assert stats.kept == 6 and stats.responses == sum(len(r["completions"]) for _, r in rows)
    for (row, r), t in zip(rows, got):
        for k, c in enumerate(r["completions"]):
            pair = tokenize_pair(smol_tokenizer, {"prompt": r["prompt"], "chosen": c, "rejected": c})
            assert t.prompt_ids == pair.prompt_ids and t.responses[k] == pair.chosen_ids
        assert t.ranks == [q - 1 for q in r["ranks"]] and t.row == row


def test_duplicates_merge_and_all_tied_lists_drop(smol_tokenizer):
    rows = [
        (1, {"prompt": "p", "completions": ["same", "other", "same"], "ranks": [2, 1, 0]}),  # 'same' keeps rank 0
        (2, {"prompt": "p", "completions": ["a", "b"], "ranks": [0, 0]}),  # every response ties
        (3, {"prompt": "p", "completions": ["a", "a"], "ranks": [0, 1]}),  # one response left
    ]
    got, stats = tokenize_rankings(smol_tokenizer, rows, "rows")
    assert len(got) == 1 and len(got[0].responses) == 2 and got[0].ranks == [0, 1]
    assert stats.merged == 2
    assert stats.dropped == {"whose responses all tie": 1, "with fewer than 2 distinct responses": 1}


# --- layouts ---------------------------------------------------------------------------------------------


def random_rankings(shapes, seed=1):
    """TokenizedRankings of random tokens: shapes = [(prompt length, [response lengths])]."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    out = []
    for i, (p, lengths) in enumerate(shapes):
        ranks = torch.randperm(len(lengths), generator=g).tolist()
        if len(lengths) > 3:
            ranks[ranks.index(3)] = 2  # a tie
        out.append(TokenizedRanking(ids(p), [ids(n) for n in lengths], ranks, row=i))
    return out


SHAPES = [(5, [7, 3, 4]), (1, [2, 9]), (12, [4, 4, 1, 6]), (3, [11, 1, 2])]


def test_k_way_prefix_shared_layout_by_hand():
    r = [TokenizedRanking([1, 2], [[3, 4], [5], [6, 7, 8]], [1, 0, 2])]
    b = collate_rankings(r, "prefix_shared")
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 2, 3, 4]]  # every response from len(prompt)
    assert b["logit_positions"].tolist() == [1, 2, 1, 1, 5, 6]  # first tokens from the last prompt token
    assert b["target_sequence"].tolist() == [0, 0, 1, 2, 2, 2]
    assert b["ranking_index"].tolist() == [[0, 1, 2]] and b["ranks"].tolist() == [[1, 0, 2]]
    allowed = prefix_shared_mask(b["sequence_ids"], b["segment_ids"])[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # y_2 sees the prompt and itself, not y_1
        [1, 1, 0, 0, 0, 1, 0, 0],  # y_3 neither y_1 nor y_2
        [1, 1, 0, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 1, 1, 1],
    ]
    assert b["num_examples"] == 1 and b["num_sequences"] == 3 and b["num_tokens"] == 8


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk", [None, 5])
def test_every_layout_gives_the_padded_logps(layout, chunk):
    model, rankings = tiny_llama(), random_rankings(SHAPES)
    with torch.no_grad():
        padded, n_padded = sequence_logps(model, collate_rankings(rankings, "padded"), chunk_size=None)
        got, n_got = sequence_logps(model, collate_rankings(rankings, layout), chunk_size=chunk)
    assert got.shape == (sum(len(r.responses) for r in rankings),)
    assert torch.equal(n_got, n_padded)
    assert torch.allclose(got, padded, atol=1e-4, rtol=0)


class Cfg:
    """The keys a RankingStep reads (DPOConfig's defaults)."""

    def __init__(self, **kw):
        defaults = {f: getattr(DPOConfig, f, None) for f in ("beta", "label_smoothing", "simpo_gamma")}
        self.__dict__.update(
            defaults,
            logprob_chunk_size=None,
            loss_type=["plackett_luce"],
            loss_weights=None,
            rpo_alpha=None,
            reference_free=False,
            ipo_length_normalize=False,
            use_weighting=False,
            ld_alpha=None,
            discopop_tau=0.05,
            f_divergence_type="reverse_kl",
            f_alpha_divergence_coef=1.0,
            ref_sync_steps=0,
            ref_sync_alpha=0.6,
            pairs_from_ranking=None,
        )
        self.beta, self.label_smoothing, self.simpo_gamma = 0.1, 0.0, 0.5
        self.__dict__.update(kw)


def loss_and_grads(step, policy, batch):
    policy.zero_grad()
    losses, metrics = step(policy, batch)
    losses.mean().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}, metrics


def assert_same_training(step, policy, rankings, layouts, pad_id=0):
    """The step's losses and every parameter gradient in each layout equal the padded layout's."""
    loss, grads, metrics = loss_and_grads(step, policy, collate_rankings(rankings, "padded", pad_id))
    assert torch.isfinite(loss).all() and loss.abs().sum() > 0
    for layout in layouts:
        got, got_grads, got_metrics = loss_and_grads(step, policy, collate_rankings(rankings, layout, pad_id))
        assert torch.allclose(got, loss, atol=1e-5, rtol=1e-4), layout
        for name, g in grads.items():
            assert torch.allclose(got_grads[name], g, atol=1e-5, rtol=1e-3), (layout, name)
        for k, v in metrics.items():
            assert torch.allclose(got_metrics[k], v, atol=1e-5), (layout, k)


@pytest.mark.parametrize("loss,mode", [("plackett_luce", None), ("sigmoid", "all_pairs"), ("ipo", "best_vs_rest")])
def test_losses_and_gradients_match_padded(loss, mode):
    policy, reference = tiny_llama(seed=0), tiny_llama(seed=1)
    step = RankingStep(reference, Cfg(loss_type=[loss], pairs_from_ranking=mode, beta=0.5))
    assert_same_training(step, policy, random_rankings(SHAPES), [la for la in LAYOUTS if la != "padded"])


def test_ranked_dataset_with_prefix_sharing_trains_as_padded(tiny_model_dir, smol_tokenizer):
    """The issue's check: a real ranked dataset (chat template, K from 2 to 4), the tiny Llama, policy !=
    reference: Plackett-Luce's loss and gradients with prefix sharing (and packed, and chunked) are the
    padded path's."""
    rows = [(i + 1, r) for i, r in enumerate(ranked_rows(6, conversational=True))]
    rankings, _ = tokenize_rankings(
        smol_tokenizer, [(n, {**r, "ranks": [q - 1 for q in r["ranks"]]}) for n, r in rows], "x"
    )
    policy, reference = load_model(str(tiny_model_dir)), load_model(str(tiny_model_dir)).requires_grad_(False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))  # policy != reference: non-zero log-ratios
    pad = smol_tokenizer.pad_token_id
    assert_same_training(
        RankingStep(reference, Cfg()), policy, rankings, ["prefix_shared", "prefix_shared_packed"], pad
    )
    chunked = RankingStep(reference, Cfg(logprob_chunk_size=7))
    assert_same_training(chunked, policy, rankings, ["prefix_shared_packed"], pad)


def test_k2_plackett_luce_step_is_the_dpo_step_on_pairs():
    """Lists of two responses with Plackett-Luce = DPOStep (sigmoid) on the same pairs: loss, gradients."""
    policy, reference = tiny_llama(seed=0), tiny_llama(seed=1)
    rankings = random_rankings([(5, [7, 3]), (2, [4, 6]), (8, [1, 5])])
    pairs = split_into_pairs(rankings, "all_pairs")
    assert [len(r.responses) for r in rankings] == [2, 2, 2] and len(pairs) == 3
    pl, pl_grads, _ = loss_and_grads(RankingStep(reference, Cfg()), policy, collate_rankings(rankings, "prefix_shared"))
    dpo_step = DPOStep(reference, Cfg(loss_type=["sigmoid"]))
    dpo, dpo_grads, _ = loss_and_grads(dpo_step, policy, collate_for("padded", 0)(pairs))
    assert torch.allclose(pl, dpo, atol=1e-6)
    for name, g in dpo_grads.items():
        assert torch.allclose(pl_grads[name], g, atol=1e-6, rtol=1e-4), name


def test_config_refusals():
    for keys, message in [
        (dict(loss_type=["plackett_luce", "sft"]), "cannot be combined"),
        (dict(loss_type=["plackett_luce"], pairs_from_ranking="all_pairs"), "whole ranking"),
        (dict(loss_type=["plackett_luce"], label_smoothing=0.1), "label_smoothing"),
        (dict(loss_type=["sigmoid"], pairs_from_ranking="all_pairs", use_weighting=True), "use_weighting"),
        (dict(loss_type=["kto"], pairs_from_ranking="all_pairs"), "loss_type"),
        (dict(loss_type=["plackett_luce"], max_tokens_per_batch=512), "max_tokens_per_batch"),
    ]:
        with pytest.raises(UserError, match=message):
            DPOConfig(dataset="x", **keys).check()


# --- end to end ------------------------------------------------------------------------------------------


def test_cli_trains_on_ranked_lists(tiny_model_dir, tmp_path):
    data = tmp_path / "ranked"
    data.mkdir()
    write_jsonl(data / "train.jsonl", ranked_rows(8, conversational=True, scores=True))
    write_jsonl(data / "test.jsonl", ranked_rows(4, conversational=True))
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"dataset={data}", f"output_dir={out}", "per_device_train_batch_size=4"]
    keys = ["max_steps=2", "learning_rate=1e-3", "logging_steps=1", "progress_bar=false"]
    assert main(["dpo", *args, *keys, "loss_type=plackett_luce", "prefix_sharing=true"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert len(train) == 2 and all(r["loss"] > 0 for r in train)
    assert any("eval/rewards/accuracies" in r for r in rows)
    assert (out / "model.safetensors").exists()


def test_api_trains_on_in_memory_rankings(tiny_model_dir, tmp_path):
    """dpokit.dpo with rows in memory and a pairwise loss on their pairs (best_vs_rest, packed)."""
    import dpokit

    config = dict(
        model=str(tiny_model_dir),
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        progress_bar=False,
        loss_type=["ipo"],
        pairs_from_ranking="best_vs_rest",
        padding_free=True,
    )
    result = dpokit.dpo(config, train_dataset=ranked_rows(8), eval_dataset=ranked_rows(3, scores=True))
    train = [r for r in result.metrics if "loss" in r]
    assert len(train) == 2 and all(r["loss"] > 0 for r in train)
    assert any("eval/rewards/margins" in r for r in result.metrics)


def word_count_reward(prompts, responses):
    """A deterministic reward for the test (`test_rankings:word_count_reward`)."""
    return [float(len(r.split())) for r in responses]


def test_pairs_writes_rankings_that_dpo_reads(tmp_path, capsys):
    samples = write_jsonl(
        tmp_path / "samples.jsonl",
        [
            {"prompt": [{"role": "user", "content": "Say hi"}], "responses": ["hi", "hi there", "hello to you", "yo"]},
            {"prompt": [{"role": "user", "content": "Tie"}], "responses": ["one", "two"]},  # all tie: dropped
            {"prompt": [{"role": "user", "content": "Two"}], "responses": ["a b", "c", "a b"]},  # a duplicate
        ],
    )
    out = tmp_path / "ranked.jsonl"
    args = ["pairs", f"samples={samples}", "reward=test_rankings:word_count_reward", f"output={out}"]
    assert main([*args, "pairing=ranking"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["completions"]) for r in rows] == [4, 2]
    assert rows[0]["scores"] == [1.0, 2.0, 3.0, 1.0]  # the tie (hi, yo) kept as a tie
    assert rows[0]["completions"][1] == [{"role": "assistant", "content": "hi there"}]
    loaded, _, fmt = load_rankings(str(out))
    assert fmt == "conversational" and loaded[0][1]["ranks"] == [2, 1, 0, 2]
    assert main([*args, "pairing=ranking", "min_margin=0.5"]) == 2
    one_error_line(capsys.readouterr().err, "min_margin")


def test_ranked_rows_read_as_pairs_say_what_to_do(tmp_path, capsys):
    path = write_jsonl(tmp_path / "r.jsonl", ranked_rows(2))
    assert main(["dpo", f"dataset={path}", f"output_dir={tmp_path / 'out'}"]) == 2
    one_error_line(capsys.readouterr().err, str(path), "row 1", "field 'chosen'", "loss_type=plackett_luce")


def test_too_many_completions(tmp_path):
    from dpokit.data.rankings import MAX_COMPLETIONS

    k = MAX_COMPLETIONS + 1
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "completions": ["a"] * k, "ranks": list(range(k))}])
    with pytest.raises(UserError, match="row 1: field 'completions'.*MAX_COMPLETIONS"):
        load_rankings(str(path))
