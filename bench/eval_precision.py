"""Evaluation in fp32 or bf16 on this device: which is faster, and is the faster one exact enough?

Issue 16 asks the sweep's evaluation to use "the faster exact one". This measures, on the embedded model
(pi_ref of the sweep) and the sweep's held-out prompts, with the evaluation's sampler (temperature 1,
top_p 1, top-k off, --new-tokens new tokens):
- sampling time: `sample_responses` of --prompts prompts in batches of --batch, fp32 vs bf16 autocast
  (the output layer in fp32 either way, as dpokit samples);
- scoring time: one `sequence_logps` forward over those samples, fp32 vs bf16 autocast;
- the error bf16 makes: the same samples' sequence log-probs under bf16 minus under fp32 (mean |diff| and
  max, nats per sequence), which is the size of error it would put into every KL of the frontier.
Each timing is taken --repeats times, A and B interleaved (fp32, bf16, fp32, bf16, ...), so load from
other work on the machine falls on both alike; the medians are reported with the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_precision.py              # results to bench/results/
    .venv/bin/python bench/eval_precision.py --prompts 8 --repeats 1         # a quick look

Results: bench/results/eval_precision.{json,md} (device, CPU flags, threads, load average, the numbers).
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dpokit import models
from dpokit.commands.evaluate import EvalConfig, held_out_prompts
from dpokit.data.batch import collate_padded
from dpokit.data.tokenize import TokenizedPair
from dpokit.logprobs import sequence_logps
from dpokit.precision import cpu_flags
from dpokit.sampling import sample_responses
from dpokit.train.runtime import to_device

ROOT = Path(__file__).resolve().parent.parent


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32, help="sampling batch (the evaluation's is 32)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    tok = models.load_tokenizer("default", False)
    model = models.load_model("default", False).eval()
    cfg = EvalConfig(prompts=str(ROOT / "data" / "sentiment" / "test.jsonl"), num_samples=args.prompts)
    _, prompts = held_out_prompts(cfg, tok, None)

    def sample(bf16):
        torch.manual_seed(0)
        with autocast(bf16):
            return sample_responses(model, tok, prompts, args.new_tokens, 1.0, 1.0, 0, batch_size=args.batch)

    def score(bf16, responses):
        pairs = [TokenizedPair(p, r, r) for p, r in zip(prompts, responses) if r]
        batch = to_device(collate_padded(pairs, tok.pad_token_id), torch.device("cpu"))
        with torch.no_grad(), autocast(bf16):
            return sequence_logps(model, batch)[0][: len(pairs)].double()

    times = {"sample fp32": [], "sample bf16": [], "score fp32": [], "score bf16": []}
    fp32_samples = sample(False)  # both precisions score the same samples (fp32's, as the evaluation draws them)
    for _ in range(args.repeats):
        for bf16, name in ((False, "fp32"), (True, "bf16")):
            t0 = time.perf_counter()
            sample(bf16)
            times[f"sample {name}"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            score(bf16, fp32_samples)
            times[f"score {name}"].append(time.perf_counter() - t0)
    exact, rounded = score(False, fp32_samples), score(True, fp32_samples)
    diff = (rounded - exact).abs()
    med = {k: statistics.median(v) for k, v in times.items()}
    flags = cpu_flags()
    result = {
        "device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
        "cpu_bf16": sorted(f for f in flags if "bf16" in f),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 2) for k, v in med.items()},
        "bf16_speedup": {
            "sample": round(med["sample fp32"] / med["sample bf16"], 2),
            "score": round(med["score fp32"] / med["score bf16"], 2),
        },
        "bf16_logp_error_nats": {"mean_abs": round(float(diff.mean()), 4), "max_abs": round(float(diff.max()), 4)},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_precision.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Evaluation precision: fp32 against bf16 autocast (bench/eval_precision.py)",
        "",
        f"{result['device']}; bf16 flags: {', '.join(result['cpu_bf16']) or 'none'}; {result['threads']} thread(s); "
        f"load average at the end {', '.join(f'{x:.1f}' for x in result['load_average'])}; {len(prompts)} held-out "
        f"prompts x {args.new_tokens} new tokens; medians of {args.repeats} interleaved repeats.",
        "",
        "| stage | fp32 s | bf16 s | bf16 speed-up |",
        "| --- | ---: | ---: | ---: |",
    ]
    for stage in ("sample", "score"):
        a, b = med[f"{stage} fp32"], med[f"{stage} bf16"]
        lines.append(f"| {stage} | {a:.2f} | {b:.2f} | {result['bf16_speedup'][stage]:.2f}x |")
    e = result["bf16_logp_error_nats"]
    lines += ["", f"bf16's error in a sequence log-prob: mean {e['mean_abs']:.4f} nats, max {e['max_abs']:.4f} nats."]
    (out / "eval_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
