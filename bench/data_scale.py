"""How dpokit's data preparation scales with the number of pairs, against TRL's DPOTrainer preparing the
same rows; and how much padding token-budget batches leave on the bundled data.

    python bench/data_scale.py                               # 10k, 50k, 100k pairs (and TRL if importable)
    python bench/data_scale.py --sizes 10000 --no-trl        # one cheap point
    python bench/data_scale.py --large                       # adds 500k

Workload: seeded synthetic chat-shaped rows (conversational: an optional system message and a user
message as the prompt, one assistant message per response), English words drawn from the bundled
sentiment data, lengths log-normal around ~150 prompt and ~120 response tokens (~400 tokens per pair with
the embedded model's chat template), written once per size as JSON lines under --work.

Measured per size, each in its own process (so its peak memory is its own):
- prepare, first run: `data.arrow.tokenize_to_table` with an empty cache (read, validate, template,
  tokenize with `datasets.map`, write the Arrow cache): wall time, and the peak RSS of the preparation
  (VmHWM, reset after imports) above the RSS before it;
- prepare, cached: the same call again (a fingerprint of the file, then the table is opened);
- train, 2 steps: `dpokit.dpo` on the file with the cache warm, a tiny random Llama with the embedded
  tokenizer (the model is not what is measured: its memory does not depend on the data), token-budget
  batches; the process's peak RSS (VmHWM) from start to end, and its growth from the smallest size;
- TRL: `datasets.load_dataset("json")` then `DPOTrainer._prepare_dataset` (its dataset processing only:
  prompt extraction, chat template, tokenization, with TRL's defaults), in a fresh datasets cache, then
  again with that cache.
Padding: on data/sentiment/train.jsonl, the fraction of each batch's computed tokens that is padding,
for batches of 8 pairs in random order vs token-budget batches, in the two layouts that pad.

Results: bench/results/data_scale.{md,json,png}. Sizes already measured are kept (the JSON is updated
after every measurement), so an interrupted run continues with --work and --out unchanged.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "sentiment" / "train.jsonl"


# --- memory --------------------------------------------------------------------------------------------


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (datasets.map's workers): what the work cost,
    which other jobs on a shared machine inflate much less than the wall-clock time."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def reset_peak():
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# --- workload ------------------------------------------------------------------------------------------


def word_pool() -> list:
    words = []
    for line in BUNDLED.read_text().splitlines():
        row = json.loads(line)
        for field in ("chosen", "rejected"):
            for m in row[field] if isinstance(row[field], list) else [{"content": row[field]}]:
                words += m["content"].split()
    return words or ["word"]


def synthetic_rows(n: int, seed: int):
    rng = np.random.default_rng(seed)
    pool = word_pool()

    def text(median_words):
        k = int(np.clip(rng.lognormal(np.log(median_words), 0.5), 5, 6 * median_words))
        return " ".join(pool[i] for i in rng.integers(0, len(pool), k))

    for i in range(n):
        prompt = [{"role": "user", "content": text(85)}]
        if i % 3 == 0:
            prompt.insert(0, {"role": "system", "content": text(15)})
        yield {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": text(80)}],
            "rejected": [{"role": "assistant", "content": text(80)}],
        }


def data_file(work: Path, n: int, seed: int) -> Path:
    path = work / f"pairs_{n}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for row in synthetic_rows(n, seed):
                f.write(json.dumps(row) + "\n")
        tmp.rename(path)
    return path


def tiny_model(work: Path) -> Path:
    out = work / "tiny-llama"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpokit.models import load_tokenizer

    tok = load_tokenizer("default")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --- children: one measurement each ----------------------------------------------------------------------


def child_prepare(args) -> dict:
    from dpokit.data.arrow import tokenize_to_table
    from dpokit.models import load_tokenizer

    tok = load_tokenizer(str(args.model_dir))
    before = status_mib("VmRSS")
    reset_peak()
    t0, c0 = time.perf_counter(), cpu_seconds()
    table, _, _, stats = tokenize_to_table(tok, args.file, "train", 1024, 512, "keep_end", num_proc=args.num_proc)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = status_mib("VmHWM")
    prompt, chosen, rejected = table.lengths()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rss_before_mib": before,
        "peak_mib": peak,
        "peak_above_before_mib": peak - before,
        "pairs": stats.kept,
        "tokens_per_pair": float(np.mean(prompt + chosen + rejected)),
    }


def child_train(args) -> dict:
    from dpokit.commands.dpo import DPOConfig, dpo

    out = Path(args.work) / f"out_{args.n}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    dpo(
        DPOConfig(
            model=str(args.model_dir),
            dataset=args.file,
            output_dir=str(out),
            max_steps=2,
            max_tokens_per_batch=2048,
            logging_steps=1,
            progress_bar=False,
            precision="fp32",
            learning_rate=1e-4,
        )
    )
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": time.perf_counter() - t0, "peak_mib": status_mib("VmHWM")}


def child_trl(args) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(args.model_dir))

    class Stub:  # _prepare_dataset reads only the tokenizer from the trainer
        _tokenizer = tok

    targs = TRLConfig(
        output_dir=str(Path(args.work) / "trl_out"), max_length=1024, report_to="none", use_cpu=True, bf16=False
    )
    before = status_mib("VmRSS")
    reset_peak()
    t0, c0 = time.perf_counter(), cpu_seconds()
    ds = datasets.load_dataset("json", data_files=args.file, split="train")
    ds = DPOTrainer._prepare_dataset(Stub(), ds, tok, targs, "train")
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = status_mib("VmHWM")
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_mib": peak,
        "peak_above_before_mib": peak - before,
        "pairs": len(ds),
    }


def run_child(kind: str, args, n: int, file: Path, env: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(n), "--file", str(file), "--work", str(args.work)]
    cmd += ["--model-dir", str(args.model_dir)] + (["--num-proc", str(args.num_proc)] if args.num_proc else [])
    print(f"  {kind} {n:,} ...", flush=True)
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1][len("RESULT ") :])


# --- padding on the bundled data ------------------------------------------------------------------------


def padding_report(budget: int, seed: int) -> dict:
    from dpokit.data.arrow import tokenize_to_table
    from dpokit.models import load_tokenizer
    from dpokit.train.order import BudgetPlan, batch_tokens, micro_batches, pair_lengths
    from dpokit.train.runtime import Ranks

    table = tokenize_to_table(load_tokenizer("default"), str(BUNDLED), "train", 1024, 512, "keep_end")[0]
    pairs = list(table)
    real = pair_lengths(pairs)
    out = {}
    for layout in ("padded", "prefix_shared"):
        useful = (2 * real[0] + real[1] + real[2]) if layout == "padded" else (real[0] + real[1] + real[2])
        fixed = micro_batches(len(pairs), 8, seed, Ranks())
        by_count = [next(fixed) for _ in range(-(-len(pairs) // 8))]
        by_budget = BudgetPlan(pairs, budget, layout).epoch(seed, 0)
        for name, batches in (("8 pairs, random order", by_count), (f"budget {budget} tokens", by_budget)):
            frac = [1 - useful[b].sum() / batch_tokens(layout, [pairs[i] for i in b]) for b in batches]
            sizes = [len(b) for b in batches]
            out[f"{layout} | {name}"] = {
                "batches": len(batches),
                "pairs_per_batch_mean": float(np.mean(sizes)),
                "padding_mean": float(np.mean(frac)),
                "padding_median": float(np.median(frac)),
                "padding_p90": float(np.percentile(frac, 90)),
                "padding_max": float(np.max(frac)),
                "padding_overall": float(
                    1
                    - sum(useful[b].sum() for b in batches)
                    / sum(batch_tokens(layout, [pairs[i] for i in b]) for b in batches)
                ),
            }
    return out


# --- report ---------------------------------------------------------------------------------------------------


def fmt(x, spec=".1f"):
    return "" if x is None else format(x, spec)


def report(results: dict) -> str:
    info = results["info"]
    lines = [
        "# dpokit data preparation at scale",
        "",
        f"- command: `{info['command']}`",
        f"- machine: {info['cpus']} CPUs, 1-minute load average {info.get('load_at_start', '?')} at the start "
        "(above ~0.5 other jobs shared them: compare ratios and CPU seconds, not wall times); "
        f"python {info['python']}; datasets {info['datasets']}; TRL {info.get('trl', 'not run')}",
        "- rows: synthetic conversational pairs (see the script); tokenizer: the embedded SmolLM2's; "
        "max_length 1024, max_prompt_length 512",
        "",
        "| pairs | tokens / pair | prepare first s (CPU s) | prepare cached s | prep peak MiB (above start) "
        "| train 2 steps peak MiB | growth vs smallest MiB | TRL prepare s (CPU s) | TRL cached s "
        "| TRL peak MiB (above start) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    sizes = sorted(int(n) for n in results["sizes"])
    base = results["sizes"].get(str(sizes[0]), {}).get("train", {}).get("peak_mib") if sizes else None
    for n in sizes:
        r = results["sizes"][str(n)]
        first, cached, train = r.get("prepare", {}), r.get("cached", {}), r.get("train", {})
        trl, trl2 = r.get("trl", {}), r.get("trl_cached", {})
        growth = train.get("peak_mib") - base if base and train.get("peak_mib") else None
        lines.append(
            f"| {n:,} | {fmt(first.get('tokens_per_pair'), '.0f')} | {fmt(first.get('seconds'))} "
            f"({fmt(first.get('cpu_seconds'))}) "
            f"| {fmt(cached.get('seconds'), '.2f')} | {fmt(first.get('peak_mib'), ',.0f')} "
            f"({fmt(first.get('peak_above_before_mib'), ',.0f')}) | {fmt(train.get('peak_mib'), ',.0f')} "
            f"| {fmt(growth, '+,.0f')} | {fmt(trl.get('seconds'))} ({fmt(trl.get('cpu_seconds'))}) "
            f"| {fmt(trl2.get('seconds'), '.2f')} "
            f"| {fmt(trl.get('peak_mib'), ',.0f')} ({fmt(trl.get('peak_above_before_mib'), ',.0f')}) |"
        )
        errors = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
        if errors:
            lines.append(f"| {n:,} failed: {errors} |" + " |" * 9)
    if results.get("padding"):
        lines += [
            "",
            "Padding on data/sentiment/train.jsonl (fraction of each batch's computed tokens that is padding; "
            "the packed layouts have none):",
            "",
            "| layout | batches | n | pairs / batch | mean | median | p90 | max | overall |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, p in results["padding"].items():
            layout, how = name.split(" | ")
            lines.append(
                f"| {layout} | {how} | {p['batches']} | {p['pairs_per_batch_mean']:.1f} | {p['padding_mean']:.3f} "
                f"| {p['padding_median']:.3f} | {p['padding_p90']:.3f} | {p['padding_max']:.3f} "
                f"| {p['padding_overall']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(n) for n in results["sizes"])
    get = lambda kind, key: [results["sizes"][str(n)].get(kind, {}).get(key) for n in sizes]  # noqa: E731
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, label in (
        ("prepare", "dpokit first run"),
        ("cached", "dpokit cached"),
        ("trl", "TRL"),
        ("trl_cached", "TRL cached"),
    ):
        ys = get(kind, "seconds")
        xs = [x for x, y in zip(sizes, ys) if y is not None]
        if xs:
            a.plot(xs, [y for y in ys if y is not None], "o-", label=label)
    a.set(xlabel="pairs", ylabel="seconds", title="preparation time", xscale="log", yscale="log")
    a.legend()
    for kind, label in (
        ("prepare", "dpokit preparation"),
        ("train", "dpokit 2 training steps"),
        ("trl", "TRL preparation"),
    ):
        ys = get(kind, "peak_mib")
        xs = [x for x, y in zip(sizes, ys) if y is not None]
        if xs:
            b.plot(xs, [y for y in ys if y is not None], "o-", label=label)
    b.set(xlabel="pairs", ylabel="peak RSS (MiB)", title="peak memory", xscale="log")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,50000,100000", help="numbers of pairs, comma-separated")
    ap.add_argument("--large", action="store_true", help="also 500,000 pairs")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL (also skipped when it is not importable)")
    ap.add_argument("--num-proc", type=int, default=None, help="dataset_num_proc (default: dpokit's)")
    ap.add_argument("--budget", type=int, default=4096, help="max_tokens_per_batch of the padding report")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--work", default="/tmp/dpokit_data_scale", help="data files, caches, the tiny model")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--force", action="store_true", help="measure sizes that already have results again")
    ap.add_argument(
        "--only", default=None, help="only these measurements, comma-separated: prepare,cached,train,trl,trl_cached"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        result = {"prepare": child_prepare, "train": child_train, "trl": child_trl}[args.child](args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    args.model_dir = tiny_model(work)
    results_file = out / "data_scale.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"sizes": {}}
    import datasets

    results["info"] = {
        "command": "python bench/data_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpus": os.cpu_count(),
        "load_at_start": round(os.getloadavg()[0], 2),  # other jobs on the machine skew the wall times
        "python": sys.version.split()[0],
        "datasets": datasets.__version__,
    }
    try:
        import trl

        results["info"]["trl"] = trl.__version__
        have_trl = not args.no_trl
    except ImportError:
        have_trl = False

    def save():
        results_file.write_text(json.dumps(results, indent=1))
        (out / "data_scale.md").write_text(report(results))

    print("padding on the bundled data ...", flush=True)
    results["padding"] = padding_report(args.budget, args.seed)
    save()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()] + ([500_000] if args.large else [])
    for n in sizes:
        r = results["sizes"].setdefault(str(n), {})
        file = data_file(work, n, args.seed)
        cache = work / f"cache_{n}"
        env = {**os.environ, "DPOKIT_CACHE": str(cache), "HF_DATASETS_CACHE": str(work / f"hf_{n}")}
        steps = [("prepare", "prepare"), ("cached", "prepare"), ("train", "train")]
        steps += [("trl", "trl"), ("trl_cached", "trl")] if have_trl else []
        for key, kind in steps:
            if args.only and key not in args.only.split(","):
                continue
            if key in r and "error" not in r[key] and not args.force:
                continue
            if key == "prepare":  # a first run: nothing of this size cached (the model's files stay)
                shutil.rmtree(cache / "tokenized", ignore_errors=True)
            if key == "trl":
                shutil.rmtree(work / f"hf_{n}", ignore_errors=True)
            r[key] = run_child(kind, args, n, file, env, args.timeout)
            print(f"    {r[key]}", flush=True)
            save()
    save()
    plot(results, out / "data_scale.png")
    print((out / "data_scale.md").read_text())


if __name__ == "__main__":
    main()
