"""Make the bundled sentiment preference dataset in data/sentiment/ (re-runnable).

The DPO paper's controlled-sentiment task, scaled down to the embedded model:

1. Prompts. Made-up movie titles are built from adjective/noun lists ("The Silent Harbor",
   "Crimson Orchard", "The Lantern of Ash", ...), shuffled with `--seed`, and split so that no
   title appears in both splits. Each title becomes one prompt asking for a one-sentence review,
   through one of a few phrasing templates, some mentioning a genre or a year.
2. Responses. For each prompt the embedded chat model (`load_model("default")`, SmolLM2-135M-Instruct)
   samples two responses with its chat template applied (default system prompt, generation prompt
   added): temperature 1.0, top_p 1.0, top_k 50 (what `model.generate(do_sample=True,
   temperature=1.0, top_p=1.0)` samples with), at most `--max-new-tokens` tokens. Generation is
   batched and written out by hand (prefill the prompt once, sample both continuations from its
   KV cache, drop finished rows from the batch) because on a 2-core CPU that is ~3x faster than
   `generate`; it samples from the same distribution.
3. Filtering. A response counts only if it ended with EOS within the token limit (so it is a
   complete sentence); it is stripped of whitespace. A pair is dropped if either response is
   incomplete or empty, the two are identical, or their rewards differ by less than 1e-6.
4. Labels. The reward is `dpokit.rewards.vader` (VADER compound sentiment of the response, in
   [-1, 1]); chosen = the response with the higher reward.

Prompts are consumed in order, batch by batch, until `--n-test` and then `--n-train` pairs are kept;
the rest of the prompt pool is spare. Output is TRL's conversational preference format, one JSON
object per line: {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
"rejected": [...], "score_chosen": float, "score_rejected": float}, in OUT/train.jsonl and
OUT/test.jsonl, with OUT/README.md describing the run. Same seed, torch version and CPU -> same data.

    .venv/bin/python data/make_sentiment_pairs.py --out data/sentiment --seed 0 --n-train 1100 --n-test 220
"""

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path
from statistics import median

import torch

from dpokit.models import load_model, load_tokenizer
from dpokit.rewards import vader

ADJECTIVES = """Silent Crimson Broken Golden Hidden Iron Velvet Hollow Burning Frozen Distant Wandering
Forgotten Electric Scarlet Midnight Shattered Gentle Restless Savage Quiet Endless Lonely Bitter
Radiant Crooked Sleeping Painted Drowned Glass Paper Copper Silver Wicked Secret Fading Northern
Sunken Wild Pale Brave Last Lost Violet Amber Emerald Twisted Dark Bright Hungry Falling Rising
Stolen Ancient Tender Hollowed Salt Stone Winter Summer Autumn""".split()

NOUNS = """Harbor Garden Empire River Lantern Orchard Signal Tide Kingdom Mirror Compass Horizon
Shadow Letter Voyage Carnival Frontier Machine Island Forest Crown Bridge Window Engine Archive
Station Desert Orchestra Labyrinth Lighthouse Mountain Circus Theory Promise Ember Meadow Citadel
Canyon Whisper Storm Tower Ballad Harvest Prophet Hunter Dancer Stranger Widow Pilgrim Detective
Orbit Echo Mask Sparrow Wolf Falcon Serpent Violin Cathedral""".split()

OF_NOUNS = """Ash Glass Dust Thunder Roses Bones Smoke Gold Salt Stars Rain Mercy Iron Ghosts Silence
Wolves Kings Tomorrow Winter Shadows""".split()

GENRES = """drama comedy thriller horror science-fiction romance western mystery fantasy war crime
musical animated documentary adventure noir""".split()

TEMPLATES = [
    'Write a one-sentence review of the movie "{title}".',
    'In one sentence, what did you think of the movie "{title}"?',
    'In one sentence, what did you think of the {genre} film "{title}"?',
    'Review the {genre} movie "{title}" in a single sentence.',
    'Review "{title}" ({year}) in a single sentence.',
    'In one sentence, give your opinion of the {year} {genre} film "{title}".',
]


def make_titles(rng: random.Random) -> list:
    titles = [f"The {a} {n}" for a, n in itertools.product(ADJECTIVES, NOUNS)]
    titles += [f"{a} {n}" for a, n in itertools.product(ADJECTIVES, NOUNS)]
    titles += [f"The {n} of {o}" for n, o in itertools.product(NOUNS, OF_NOUNS)]
    titles = sorted(set(titles))
    rng.shuffle(titles)
    # "The Silent Harbor" and "Silent Harbor" read as the same movie: keep one of them only.
    seen, out = set(), []
    for t in titles:
        key = t.removeprefix("The ")
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def make_prompts(titles: list, rng: random.Random) -> list:
    return [
        rng.choice(TEMPLATES).format(title=t, genre=rng.choice(GENRES), year=rng.randint(1950, 2024)) for t in titles
    ]


@torch.inference_mode()
def sample_pairs(model, tok, prompts: list, max_new_tokens: int, temperature: float, top_k: int):
    """Two sampled responses per prompt -> list of (text_a, text_b); a text is None if it did not end with EOS."""
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc.attention_mask
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=enc.input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    # Both samples for a prompt continue from the same prefill: rows 2i and 2i+1 belong to prompt i.
    cache.batch_repeat_interleave(2)
    logits = out.logits[:, -1].float().repeat_interleave(2, 0)
    mask = mask.repeat_interleave(2, 0)
    pos = pos[:, -1:].repeat_interleave(2, 0)

    eos, n = tok.eos_token_id, 2 * len(prompts)
    bad_ids = torch.tensor(sorted(set(tok.all_special_ids) - {eos}))
    tokens = [[] for _ in range(n)]
    ended = [False] * n
    active = torch.arange(n)
    for step in range(max_new_tokens):
        if top_k > 0:  # sample among the top k only: a multinomial over the whole vocabulary is slow on CPU
            vals, idx = torch.topk(logits, top_k, dim=-1)
            nxt = idx.gather(1, torch.multinomial(torch.softmax(vals / temperature, -1), 1))  # [active, 1]
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1)
        done = torch.zeros(len(active), dtype=torch.bool)
        for j, (row, t) in enumerate(zip(active.tolist(), nxt[:, 0].tolist())):
            if t == eos:
                ended[row] = done[j] = True
            elif (bad_ids == t).any():  # a stray special token: not a clean answer
                done[j] = True
            else:
                tokens[row].append(t)
        keep = (~done).nonzero()[:, 0]
        if len(keep) == 0 or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            cache.batch_select_indices(keep)
            active, nxt, mask, pos = active[keep], nxt[keep], mask[keep], pos[keep]
        mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype)], 1)
        pos = pos + 1
        logits = (
            model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            .logits[:, -1]
            .float()
        )
    texts = [tok.decode(t, skip_special_tokens=True).strip() if e else None for t, e in zip(tokens, ended)]
    return [(texts[2 * i], texts[2 * i + 1]) for i in range(len(prompts))]


def make_split(name, model, tok, prompts, n_pairs, args, stats):
    rows, used, t0 = [], 0, time.time()
    for start in range(0, len(prompts), args.batch_prompts):
        batch = prompts[start : start + args.batch_prompts]
        tb = time.time()
        pairs = sample_pairs(model, tok, batch, args.max_new_tokens, args.temperature, args.top_k)
        stats["batch_seconds"].append(time.time() - tb)
        used += len(batch)
        for prompt, (a, b) in zip(batch, pairs):
            stats["responses"] += 2
            stats["incomplete"] += (a is None) + (b is None)
            if a is None or b is None:
                stats["drop_incomplete"] += 1
                continue
            if not a or not b:
                stats["drop_empty"] += 1
                continue
            if a == b:
                stats["drop_identical"] += 1
                continue
            sa, sb = vader([prompt, prompt], [a, b])
            if abs(sa - sb) < 1e-6:
                stats["drop_tie"] += 1
                continue
            (c, sc), (r, sr) = sorted([(a, sa), (b, sb)], key=lambda x: -x[1])
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}],
                    "score_chosen": sc,
                    "score_rejected": sr,
                }
            )
        dt = time.time() - t0
        print(
            f"[{name}] prompts {used}/{len(prompts)}  pairs {len(rows)}/{n_pairs}  "
            f"{dt:.0f}s  ({2 * used / dt:.1f} responses/s)",
            flush=True,
        )
        if len(rows) >= n_pairs:
            break
    if len(rows) < n_pairs:
        sys.exit(f"[{name}] only {len(rows)} pairs from {len(prompts)} prompts; raise --pool or --max-new-tokens")
    stats[name + "_prompts"] = used
    return rows[:n_pairs]


def summary(rows):
    n = len(rows)
    return {
        "n": n,
        "mean_chosen": sum(r["score_chosen"] for r in rows) / n,
        "mean_rejected": sum(r["score_rejected"] for r in rows) / n,
        "frac_chosen_pos": sum(r["score_chosen"] > 0 for r in rows) / n,
        "frac_rejected_neg": sum(r["score_rejected"] < 0 for r in rows) / n,
    }


def write_readme(out: Path, args, s_train, s_test, stats, seconds):
    argv = f"--out {args.out} --seed {args.seed} --n-train {args.n_train} --n-test {args.n_test}"
    extra = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in [
            ("max_new_tokens", args.max_new_tokens),
            ("temperature", args.temperature),
            ("top_k", args.top_k),
            ("batch_prompts", args.batch_prompts),
            ("dtype", args.dtype),
        ]
        if v != DEFAULTS[k]
    ]
    cmd = " ".join([".venv/bin/python data/make_sentiment_pairs.py", argv, *extra])
    kept = s_train["n"] + s_test["n"]
    table = "\n".join(
        f"| {name} | {s['n']} | {s['mean_chosen']:+.3f} | {s['mean_rejected']:+.3f} | "
        f"{s['frac_chosen_pos']:.1%} | {s['frac_rejected_neg']:.1%} |"
        for name, s in (("train", s_train), ("test", s_test))
    )
    text = f"""# Sentiment preference pairs

A small preference dataset for the DPO paper's controlled-sentiment task, made with the embedded model.
Written by `data/make_sentiment_pairs.py` (see its docstring); regenerate with

    {cmd}

- **Prompts**: a request for a one-sentence review of a made-up movie ("Write a one-sentence review of
  the movie \\"The Silent Harbor\\"."), from combinatorial titles and {len(TEMPLATES)} phrasing templates, some
  with a genre or year. Titles are shuffled with the seed; train and test share no title.
- **Model**: `load_model("default")` = SmolLM2-135M-Instruct (embedded GGUF, dequantised), run in {args.dtype},
  prompt = the tokenizer's chat template (default system prompt) with the generation prompt added.
- **Sampling**: two responses per prompt, temperature {args.temperature}, top_p 1.0, top_k {args.top_k}
  (`generate`'s default), at most {args.max_new_tokens} new tokens, `torch.manual_seed({args.seed})`.
- **Reward**: `dpokit.rewards.vader`, VADER compound sentiment of the response in [-1, 1].
  chosen = the higher-scoring response.
- **Filtering**: a response must end with EOS within the token limit (complete), and is stripped; a pair is
  dropped if either response is incomplete or empty, the two are identical, or |score difference| < 1e-6.
  Of {stats["train_prompts"] + stats["test_prompts"]} prompts used ({stats["responses"]} responses,
  {stats["incomplete"]} incomplete): {stats["drop_incomplete"]} pairs dropped as incomplete,
  {stats["drop_empty"]} empty, {stats["drop_identical"]} identical, {stats["drop_tie"]} tied; {kept} kept
  (spare pairs past the target are not written).
- **Format**: TRL conversational preference rows, one JSON object per line:
  `{{"prompt": [{{"role": "user", ...}}], "chosen": [{{"role": "assistant", ...}}], "rejected": [...],
  "score_chosen": float, "score_rejected": float}}`.
- **Generation time**: {seconds / 60:.1f} min wall-clock on the CPU ({torch.get_num_threads()} threads);
  median {median(stats["batch_seconds"]):.1f} s per batch of {args.batch_prompts} prompts
  ({len(stats["batch_seconds"])} batches).

| split | pairs | mean score chosen | mean score rejected | chosen positive | rejected negative |
|---|---|---|---|---|---|
{table}
"""
    (out / "README.md").write_text(text)


DEFAULTS = {"max_new_tokens": 48, "temperature": 1.0, "top_k": 50, "batch_prompts": 32, "dtype": "bfloat16"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/sentiment", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=1100, help="training pairs to keep")
    ap.add_argument("--n-test", type=int, default=220, help="held-out pairs to keep")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"])
    ap.add_argument("--temperature", type=float, default=DEFAULTS["temperature"])
    ap.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], help="0 = no top-k cut")
    ap.add_argument(
        "--batch-prompts", type=int, default=DEFAULTS["batch_prompts"], help="prompts per batch (2 responses each)"
    )
    ap.add_argument("--dtype", default=DEFAULTS["dtype"], choices=["bfloat16", "float32"])
    ap.add_argument("--pool", type=float, default=3.0, help="prompts available per wanted pair")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    titles = make_titles(rng)
    n_test_pool = int(args.n_test * args.pool)
    n_train_pool = int(args.n_train * args.pool)
    if n_test_pool + n_train_pool > len(titles):
        sys.exit(f"only {len(titles)} titles for {n_test_pool + n_train_pool} prompts; lower --pool")
    test_prompts = make_prompts(titles[:n_test_pool], rng)
    train_prompts = make_prompts(titles[n_test_pool : n_test_pool + n_train_pool], rng)
    print(f"{len(titles)} titles; prompt pools: test {len(test_prompts)}, train {len(train_prompts)}", flush=True)

    torch.manual_seed(args.seed)
    tok = load_tokenizer("default")
    tok.padding_side = "left"
    model = load_model("default", dtype=getattr(torch, args.dtype)).eval()

    stats = dict.fromkeys(["responses", "incomplete", "drop_incomplete", "drop_empty", "drop_identical", "drop_tie"], 0)
    stats["batch_seconds"] = []
    t0 = time.time()
    test = make_split("test", model, tok, test_prompts, args.n_test, args, stats)
    train = make_split("train", model, tok, train_prompts, args.n_train, args, stats)
    seconds = time.time() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    s_train, s_test = summary(train), summary(test)
    write_readme(out, args, s_train, s_test, stats, seconds)
    stats["batch_seconds"] = f"median {median(stats['batch_seconds']):.1f} s x {len(stats['batch_seconds'])}"
    print(f"generation {seconds / 60:.1f} min; stats {stats}")
    for name, s in (("train", s_train), ("test", s_test)):
        print(name, {k: round(v, 4) for k, v in s.items()})


if __name__ == "__main__":
    main()
