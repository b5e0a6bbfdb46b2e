"""ddp against fsdp on N processes (CPU, gloo): tokens/s and each rank's peak memory while training.

    python bench/world.py --world 2            # or: python bench/vs_trl.py --world 2

Each parallelism runs `dpokit.dpo` on the embedded SmolLM2-135M under `torchrun --standalone
--nproc_per_node N`, fp32, on the first pairs of data/sentiment, the same steps and global batch for
both. Measured per rank:
- peak memory of the training steps: the RSS high-water mark (Linux VmHWM), reset when training begins
  (after the model is loaded and, under fsdp, sharded: each process loads the whole model first, a
  start-up cost that sharding then gives back; the whole process's peak is in the JSON as
  process_peak_mib) and read at the end of the last step (the final checkpoint and export are not
  training); also that peak minus the process's baseline (its RSS once torch, transformers and dpokit
  are imported: memory no parallelism can shard);
- with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_) in both, so that RSS follows
  the live tensors rather than what the allocator keeps after they are freed;
- both with gradient checkpointing and the chunked head, so that activations stay small beside the
  model's state (weights, gradients, Adam's moments, the reference), which is what fsdp shards;
- tokens/s: tokens of all ranks per second, the mean of the logged rows after the first `--warmup`.
Writes bench/results/world<N>.json and .md.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "sentiment" / "train.jsonl"


def vm(key: str) -> float:
    """A /proc/self/status memory line in MiB (VmHWM, VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args):
    """One rank of one configuration (run by torchrun)."""
    import dpokit
    from dpokit.train.callbacks import Callback

    rank = int(os.environ.get("RANK", "0"))

    class Memory(Callback):
        def on_train_begin(self, state):
            self.start_rss = vm("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS

        def on_step_end(self, state):
            if state.step == state.total_steps:  # the steps' peak, before the final checkpoint and export
                self.peak = vm("VmHWM")

    # the libraries' own memory is part of the baseline: import what training imports (transformers is lazy)
    import torch.distributed.fsdp  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import dpokit.commands.dpo  # noqa: F401

    baseline = vm("VmRSS")  # the interpreter, torch, transformers, dpokit: what any process pays
    memory = Memory()
    config = {
        "model": "default",
        "dataset": args.data,
        "output_dir": str(Path(args.work) / args.parallelism),
        "parallelism": args.parallelism,
        "precision": "fp32",
        "max_steps": args.steps,
        "logging_steps": 1,
        "per_device_train_batch_size": args.batch,
        "max_length": args.max_length,
        "max_prompt_length": args.max_length // 2,
        "learning_rate": 1e-6,
        "progress_bar": False,
        # lean activations, so that what is measured is mostly the model's state, which is what fsdp shards
        "gradient_checkpointing": True,
        "logprob_chunk_size": 256,
    }
    result = dpokit.dpo(config, callbacks=[memory])
    rows = [r for r in result.metrics if "tokens_per_second" in r]
    out = {
        "rank": rank,
        "peak_train_mib": memory.peak,
        "baseline_mib": baseline,
        "peak_above_baseline_mib": memory.peak - baseline,
        "rss_at_train_start_mib": memory.start_rss,
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if rank == 0:
        out["tokens_per_second"] = statistics.mean(r["tokens_per_second"] for r in rows[args.warmup :] or rows)
        out["loss"] = [r["loss"] for r in rows]
    Path(args.work, f"{args.parallelism}-rank{rank}.json").write_text(json.dumps(out))


def make_data(path: Path, n: int):
    rows = DATA.read_text().splitlines()[:n]
    path.write_text("\n".join(rows) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2, help="processes (torchrun --nproc_per_node)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="first logged rows left out of tokens/s")
    ap.add_argument("--batch", type=int, default=2, help="per_device_train_batch_size")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--parallelism", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_world_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pairs.jsonl"
    make_data(data, args.world * args.batch * args.steps)
    # glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which freed
    # tensors stay in the heap and RSS no longer falls when they go: a fixed threshold keeps large tensors
    # mmapped, so RSS follows the live tensors (without it both peaks read ~4 GB here, whatever is live)
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}
    results = {}
    for parallelism in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.world)]
        cmd += [__file__, "--worker", "--parallelism", parallelism, "--data", str(data), "--work", str(work)]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
        cmd += ["--max-length", str(args.max_length)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(f"{parallelism} failed:\n{r.stderr[-3000:]}")
        ranks = [json.loads((work / f"{parallelism}-rank{i}.json").read_text()) for i in range(args.world)]
        first = ranks[0]
        results[parallelism] = {"tokens_per_second": first["tokens_per_second"], "loss": first["loss"], "ranks": ranks}

    def ratio(key):
        return max(r[key] for r in results["fsdp"]["ranks"]) / max(r[key] for r in results["ddp"]["ranks"])

    ratios = {key: ratio(key) for key in ("peak_train_mib", "peak_above_baseline_mib")}
    lines = [
        f"# ddp vs fsdp, {args.world} processes (CPU, gloo, embedded SmolLM2-135M, fp32)",
        "",
        f"{args.steps} steps of {args.world} x {args.batch} pairs, max_length {args.max_length}; "
        f"gradient_checkpointing, logprob_chunk_size 256; tokens/s over the steps after the first {args.warmup}; "
        "peak = RSS high-water mark over the training steps (reset when training begins, read at the last "
        "step's end); above baseline = that peak minus the RSS of the process once torch, transformers and "
        "dpokit are imported; MALLOC_MMAP_THRESHOLD_=131072 (RSS follows the live tensors).",
        "",
        "| parallelism | tokens/s (all ranks) | rank | peak MiB | above baseline MiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, res in results.items():
        for r in res["ranks"]:
            lines.append(
                f"| {name} | {res['tokens_per_second']:.0f} | {r['rank']} | {r['peak_train_mib']:.0f} "
                f"| {r['peak_above_baseline_mib']:.0f} |"
            )
    lines += [
        "",
        f"fsdp / ddp, largest rank: peak {ratios['peak_train_mib']:.2f}, "
        f"above baseline {ratios['peak_above_baseline_mib']:.2f}",
    ]
    report = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"world{args.world}.json").write_text(json.dumps({**results, "ratios": ratios}, indent=1))
    (out / f"world{args.world}.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
