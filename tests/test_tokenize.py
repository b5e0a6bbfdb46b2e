"""Tokenization exact at the prompt/response boundary, with two tokenizers: the embedded model's
byte-level BPE (with its chat template), and a sentencepiece-style BPE trained here whose merges
cross a space and a newline at the boundary and which adds its own BOS."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from dpokit.data.tokenize import TokenizedPair, explicit_prompt, tokenize_dataset, tokenize_pair, truncate


@pytest.fixture(scope="module")
def crossing_tokenizer():
    """BPE over Metaspace pre-tokens ('▁' marks a space), trained so that '▁yes', ':\\nyes' and
    '\\nno' are single tokens: a prompt ending in ' ' or '\\n' then merges with the response."""
    corpus = [
        "Question: is it good?\nyes",
        "Question: is it bad?\nno",
        "Answer: yes",
        "Answer: no",
        "Reply:\nyes indeed",
        "Reply:\nno way",
    ] * 200
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.pad_token = fast.eos_token
    return fast


def check_pair(tok, prompt_text, response_text, pair_prompt, pair_response, special=True):
    """The contract: prompt ids are what generation is fed; prompt + response decodes to the text;
    exactly one EOS ends the response; at most one BOS."""
    assert pair_prompt == tok(prompt_text, add_special_tokens=special)["input_ids"]
    assert pair_response[-1] == tok.eos_token_id and tok.eos_token_id not in pair_response[:-1]
    ids = pair_prompt + pair_response[:-1]
    assert tok.decode(ids, skip_special_tokens=True) == tok.decode(
        tok(prompt_text + response_text, add_special_tokens=special)["input_ids"], skip_special_tokens=True
    )
    if tok.bos_token_id is not None:
        assert ids.count(tok.bos_token_id) <= 1


@pytest.mark.parametrize(
    "prompt,response",
    [
        ("Answer: ", "yes"),  # the space merges with the response's first word
        ("Question: is it good?\n", "yes"),
        ("Reply:\n", "yes indeed"),  # ':\n' + 'yes' merges across the newline
        ("Answer:", " no"),  # clean boundary
    ],
)
def test_crossing_tokenizer_boundary(crossing_tokenizer, prompt, response):
    tok = crossing_tokenizer
    whole = tok(prompt + response)["input_ids"]
    pair = tokenize_pair(tok, {"prompt": prompt, "chosen": response, "rejected": response + " no"})
    check_pair(tok, prompt, response, pair.prompt_ids, pair.chosen_ids)
    assert pair.prompt_ids[0] == tok.bos_token_id
    if prompt.endswith((" ", "\n")):
        # the merge really crosses the boundary: the naive split of tok(prompt + response) would be wrong
        assert whole[: len(pair.prompt_ids)] != pair.prompt_ids


def test_crossing_really_happens(crossing_tokenizer):
    tok = crossing_tokenizer
    assert "▁yes" in tok.convert_ids_to_tokens(tok("Answer: yes")["input_ids"])
    assert tok("Answer: ")["input_ids"] != tok("Answer: yes")["input_ids"][: len(tok("Answer: ")["input_ids"])]


@pytest.mark.parametrize(
    "prompt,response",
    [
        ("The movie was", " great."),
        ("Review: ", "great fun"),  # byte-level BPE merges ' great' across the boundary
        ("Line one\n", "line two"),
        ("Q: 2+2=", "4"),
    ],
)
def test_embedded_tokenizer_standard(smol_tokenizer, prompt, response):
    pair = tokenize_pair(smol_tokenizer, {"prompt": prompt, "chosen": response, "rejected": "no"})
    check_pair(smol_tokenizer, prompt, response, pair.prompt_ids, pair.chosen_ids)


def test_embedded_tokenizer_conversational(smol_tokenizer):
    tok = smol_tokenizer
    prompt = [{"role": "user", "content": "Write a one-sentence movie review."}]
    chosen = [{"role": "assistant", "content": "A warm, funny delight."}]
    rejected = [{"role": "assistant", "content": "A cold, dull slog."}]
    pair = tokenize_pair(tok, {"prompt": prompt, "chosen": chosen, "rejected": rejected})
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    # exactly what generation is fed: the templated prompt with the assistant header
    assert pair.prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert tok.decode(pair.chosen_ids) == "A warm, funny delight.<|im_end|>"
    assert tok.decode(pair.rejected_ids) == "A cold, dull slog.<|im_end|>"
    assert pair.chosen_ids.count(tok.eos_token_id) == 1 and pair.chosen_ids[-1] == tok.eos_token_id
    # the template's own text for prompt + response is reproduced token for token (up to its final newline)
    full = tok.apply_chat_template(prompt + chosen, tokenize=False)
    assert tok.decode(pair.prompt_ids + pair.chosen_ids) + "\n" == full


def test_implicit_prompt_conversational(smol_tokenizer):
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Review 'Iron Tide'."}
    row = {
        "chosen": [system, user, {"role": "assistant", "content": "Great!"}],
        "rejected": [system, user, {"role": "assistant", "content": "Bad."}],
    }
    ex = explicit_prompt(row)
    assert ex["prompt"] == [system, user]
    assert ex["chosen"] == [{"role": "assistant", "content": "Great!"}]
    explicit = tokenize_pair(
        smol_tokenizer, {"prompt": [system, user], "chosen": ex["chosen"], "rejected": ex["rejected"]}
    )
    implicit = tokenize_pair(smol_tokenizer, row)
    assert implicit == explicit


def test_implicit_prompt_text():
    ex = explicit_prompt({"chosen": "Human: hi\n\nAssistant: great movie", "rejected": "Human: hi\n\nAssistant: gross"})
    assert ex == {"prompt": "Human: hi\n\nAssistant: ", "chosen": "great movie", "rejected": "gross"}


def test_existing_eos_not_doubled(smol_tokenizer):
    pair = tokenize_pair(smol_tokenizer, {"prompt": "Hi", "chosen": " there<|im_end|>", "rejected": " you"})
    assert pair.chosen_ids.count(smol_tokenizer.eos_token_id) == 1


def test_truncation_modes():
    pair = TokenizedPair(list(range(10)), [20, 21, 22, 2], [30, 31, 2])
    assert truncate(pair, None, 4, "keep_end").prompt_ids == [6, 7, 8, 9]
    assert truncate(pair, None, 4, "keep_start").prompt_ids == [0, 1, 2, 3]
    t = truncate(pair, 12, None, "keep_end")  # room for 2 response tokens; EOS is cut off
    assert t.chosen_ids == [20, 21] and t.rejected_ids == [30, 31]
    t = truncate(pair, 7, 5, "keep_end")  # prompt cut first, then the responses
    assert t.prompt_ids == [5, 6, 7, 8, 9] and t.chosen_ids == [20, 21]
    assert truncate(pair, 10, None, "keep_end") is None  # no room for any response token


def test_dropped_pairs_are_counted(smol_tokenizer):
    rows = [
        (1, {"prompt": "a " * 50, "chosen": "yes", "rejected": "no"}),
        (2, {"prompt": "short", "chosen": " yes", "rejected": " no"}),
        (3, {"prompt": "same", "chosen": " x", "rejected": " x"}),
    ]
    out, stats = tokenize_dataset(smol_tokenizer, rows, "mem", max_length=20, max_prompt_length=None)
    assert [p.row for p in out] == [2]
    assert stats.dropped == {"whose response would be empty after truncation": 1, "with chosen equal to rejected": 1}
    assert "1 pairs kept, 2 dropped" in stats.summary()
