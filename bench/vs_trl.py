"""dpokit against TRL's DPOTrainer: speed, memory, hardware utilisation and loss agreement, in one run.

    python bench/vs_trl.py                                   # CPU: the embedded SmolLM2-135M, --scale 0.25
    python bench/vs_trl.py --device cuda --model qwen2-0.5b  # GPU: a Qwen2-0.5B-shaped model, random weights

Both frameworks get the same model weights, the same token ids, the same batches in the same order, the
same batch size, precision, optimizer (torch AdamW, weight decay 0), learning rate and linear schedule,
beta and gradient clipping; each configuration runs in its own subprocess so that peak memory is its own.

Workload. A seeded synthetic preference set: prompt and response lengths are log-normal, clipped to
[50, 800] prompt tokens (median 200) and [20, 600] response tokens (median 150) -- the shape of chat
preference data such as UltraFeedback -- times `--scale` (0.25 on CPU). The token ids are slices of the
bundled sentiment data's text (model-written English, so log-probs are those of real text; random ids if
the file is missing); each response ends with EOS.

Alignment. dpokit's own loop (`loop.train`) draws batch k as the k-th chunk of its seeded permutation
(`loop.micro_batches`). TRL is handed those batches' pairs, concatenated in that order, as an already
tokenized dataset (`_prepare_dataset` is skipped: the ids are dpokit's) with `train_sampling_strategy=
"sequential"`, so its step k sees the same pairs in the same order; the collators' inputs are recorded
and checked against the order. Both record the loss of every step (before that step's update).

Measured, per configuration:
- step time: median over the steps after `--warmup`, one step = from the start of a step's forward to
  the start of the next one (everything the loop does: forward, backward, clipping, optimizer, logging);
- tokens/s: tokens of the batch as two plain sequences per pair (2 prompt + chosen + rejected, no
  padding; the same number for every framework and layout) per second over the timed steps;
- peak memory of the training phase (from after the models are loaded and any reference precompute is
  done, to the last step): the RSS high-water mark on CPU (VmHWM, reset at the start of training; the
  whole process's peak, loading included, is in the JSON as process_peak_mib), torch.cuda.max_memory_allocated
  on GPU;
- MFU: model FLOPs per second / the device's measured peak (a large matmul in the same precision).
  Model FLOPs are what a padding-free implementation of *that configuration* must compute: 3 forwards
  of the policy, plus 1 of the reference unless precomputed; a forward is 2 x (non-embedding
  parameters) per token computed, 2 x vocab x hidden per response token (the only logits DPO needs),
  and 4 x heads x head_dim per causal (query, key) pair per layer. Prefix sharing counts the prompt
  once. Recomputation (gradient checkpointing, the chunked head's backward) is not counted;
- loss difference: max over the first 20 steps of |loss_dpokit - loss_TRL| for the TRL run with the
  same gradient checkpointing and reference setting.
"""

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT_POOL = ROOT / "data" / "sentiment" / "train.jsonl"
PARITY_STEPS = 20

# Random-weight models of published shapes, for GPU runs (the tokenizer is the embedded model's; its ids
# are valid in these larger vocabularies, and the full vocabulary keeps the lm_head's real cost).
ARCHS = {
    "qwen2-0.5b": (
        "qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1e6,
            max_position_embeddings=32768,
        ),
    ),
    "qwen2-1.5b": (
        "qwen2",
        dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1e6,
            max_position_embeddings=32768,
        ),
    ),
    "llama-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            max_position_embeddings=131072,
        ),
    ),
    "smollm2-135m": (
        "llama",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_theta=100000.0,
            max_position_embeddings=8192,
        ),
    ),
}

# The configurations of the main table: (framework, name, options). The headline is "dpokit defaults"
# (no layout key given: what `dpokit dpo` runs) against "TRL" (DPOTrainer's defaults).
HEADLINE = ("dpokit defaults", "TRL")
CONFIGS = [
    ("trl", "TRL", {}),
    ("trl", "TRL precomputed ref", {"precompute": True}),
    ("dpokit", "dpokit defaults", {"layout": "defaults"}),
    ("dpokit", "dpokit padded", {"layout": "padded"}),
    ("dpokit", "dpokit fast", {"layout": "fast"}),
    ("dpokit", "dpokit fast, precomputed ref", {"layout": "fast", "precompute": True}),
]


# --- workload ----------------------------------------------------------------------------------------


def prepare_model(spec: str, work: Path, seed: int) -> Path:
    """A local model directory: the embedded default, or a named shape with seeded random weights."""
    from dpokit import models

    if spec == "default":
        return Path(models.resolve("default"))
    if spec not in ARCHS:
        raise SystemExit(f"--model: {spec!r} is not 'default' or one of {', '.join(ARCHS)}")
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, shape = ARCHS[spec]
    out = work / spec
    if not (out / "config.json").is_file():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **shape), dtype=torch.float32)
        model.save_pretrained(out)
        models.load_tokenizer("default").save_pretrained(out)
    return out


def log_normal_lengths(rng, n: int, median: float, sigma: float, low: int, high: int, scale: float):
    lengths = rng.lognormal(math.log(median * scale), sigma, n)
    return np.clip(np.round(lengths), max(1, round(low * scale)), max(1, round(high * scale))).astype(int)


def token_pool(tokenizer, rng) -> list:
    """Token ids of real text to cut prompts and responses from."""
    if TEXT_POOL.is_file():
        texts = []
        for line in TEXT_POOL.read_text().splitlines():
            row = json.loads(line)
            for key in ("prompt", "chosen", "rejected"):
                texts += [m["content"] for m in row[key]] if isinstance(row[key], list) else [row[key]]
        return tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    return [t for t in rng.integers(0, len(tokenizer), 200_000).tolist() if t not in special]


def synthetic_pairs(tokenizer, n: int, seed: int, scale: float, fixed_length: int | None = None) -> list:
    """n (prompt_ids, chosen_ids, rejected_ids) triples; `fixed_length`: every sequence that long, prompt half."""
    rng = np.random.default_rng(seed)
    pool = token_pool(tokenizer, rng)
    eos = tokenizer.eos_token_id
    if fixed_length:
        P = np.full(n, fixed_length // 2)
        C = R = np.full(n, fixed_length - fixed_length // 2)
    else:
        P = log_normal_lengths(rng, n, 200, 0.7, 50, 800, scale)
        C = log_normal_lengths(rng, n, 150, 0.8, 20, 600, scale)
        R = log_normal_lengths(rng, n, 150, 0.8, 20, 600, scale)

    def cut(length, end_with_eos=False):
        start = int(rng.integers(0, len(pool) - length))
        ids = pool[start : start + length]
        return ids[:-1] + [eos] if end_with_eos else ids

    return [(cut(int(p)), cut(int(c), True), cut(int(r), True)) for p, c, r in zip(P, C, R)]


def batch_order(n: int, batch: int, steps: int, seed: int) -> list:
    """The pair indices of dpokit's first `steps` batches (its loop's own data order)."""
    from dpokit.train.order import micro_batches
    from dpokit.train.runtime import Ranks

    stream = micro_batches(n, batch, seed, Ranks())
    return [next(stream) for _ in range(steps)]


# --- FLOPs and the device's peak -----------------------------------------------------------------------


def shape_of(model_config) -> dict:
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {
        "layers": c.num_hidden_layers,
        "attn_width": c.num_attention_heads * head_dim,
        "hidden": c.hidden_size,
        "vocab": c.vocab_size,
    }


def forward_flops(pairs, shape: dict, backbone_params: int, shared_prompt: bool) -> float:
    """FLOPs of one forward over the pairs, padding-free, logits only where a response token is predicted."""
    tokens = responses = attn_pairs = 0
    for p, c, r in (map(len, pair) for pair in pairs):
        responses += c + r
        if shared_prompt:  # [prompt | chosen | rejected]: each response sees the prompt and itself
            tokens += p + c + r
            attn_pairs += p * (p + 1) / 2 + c * p + c * (c + 1) / 2 + r * p + r * (r + 1) / 2
        else:
            tokens += 2 * p + c + r
            attn_pairs += (p + c) * (p + c + 1) / 2 + (p + r) * (p + r + 1) / 2
    return (
        2 * backbone_params * tokens
        + 2 * shape["vocab"] * shape["hidden"] * responses
        + 4 * shape["attn_width"] * shape["layers"] * attn_pairs
    )


def step_flops(pairs, shape, backbone_params, shared_prompt: bool, precomputed: bool) -> float:
    f = forward_flops(pairs, shape, backbone_params, shared_prompt)
    return 3 * f + (0 if precomputed else f)


def matmul_peak(device: str, precision: str) -> float:
    """FLOP/s of the best of several large square matmuls in the training precision."""
    n = 8192 if device == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(8):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4 if device == "cuda" else 1):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / (4 if device == "cuda" else 1))
    return 2 * n**3 / best


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return (
            f"{fields['Model name'].strip()} ({fields['CPU(s)'].strip()} CPUs, torch threads {torch.get_num_threads()})"
        )
    except (OSError, KeyError):
        return platform.processor() or "cpu"


# --- one configuration, in its own process -----------------------------------------------------------


def reset_peak_memory(device: str) -> None:
    """Start the training phase's peak here: loading a checkpoint briefly holds its weights twice, a cost
    of start-up rather than of training, and it differs between the frameworks' loaders."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


def peak_memory_mib(device: str) -> float:
    """The training phase's peak: CUDA max allocated, or the RSS high-water mark (VmHWM) since the reset."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def process_peak_mib(device: str) -> float:
    """The whole process's peak, start-up included."""
    if device == "cuda":
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class StepClock:
    """Start of every step's forward; step k lasts until step k+1 starts (the last one until its end).
    Wall-clock and this process's CPU time (which other processes on a shared machine barely inflate)."""

    def __init__(self, device):
        self.device, self.starts, self.last_end = device, [], None

    @staticmethod
    def now():
        return time.perf_counter(), time.process_time()

    def start(self):
        sync(self.device)
        self.starts.append(self.now())

    def end(self):
        sync(self.device)
        self.last_end = self.now()

    def durations(self) -> tuple:
        """(wall seconds, CPU seconds) of every step."""
        spans = list(zip(self.starts, self.starts[1:] + [self.last_end]))
        return [b[0] - a[0] for a, b in spans], [b[1] - a[1] for a, b in spans]


def run_dpokit(job: dict, pairs: list, work: Path) -> dict:
    """dpokit's own loop (loop.train) with DPOStep, wired as dpokit.dpo (commands/dpo.py) wires it."""
    from dpokit import models
    from dpokit.commands.dpo import DPOConfig, resolve_layout
    from dpokit.data.layouts import collate_for, layout_name
    from dpokit.data.tokenize import TokenizedPair
    from dpokit.train import dpo_step, loop, refcache
    from dpokit.train.runtime import setup_distributed

    fast = job["layout"] == "fast"
    layout_keys = dict(
        padding_free=fast and job["fast_layout"] in ("packed", "prefix_shared_packed"),
        prefix_sharing=fast and job["fast_layout"].startswith("prefix_shared"),
        logprob_chunk_size=job["chunk_size"] if fast else None,
    )
    cfg = DPOConfig(
        model=job["model_dir"],
        dataset="synthetic",
        output_dir=str(work / "out"),
        max_length=None,
        max_prompt_length=None,
        learning_rate=job["lr"],
        lr_scheduler="linear",
        warmup_steps=0,
        per_device_train_batch_size=job["batch"],
        per_device_eval_batch_size=job["batch"],
        max_steps=job["steps"],
        precision=job["precision"],
        beta=job["beta"],
        seed=job["seed"],
        gradient_checkpointing=job["gc"],
        precompute_ref_log_probs=job.get("precompute", False),
        progress_bar=False,
        **({} if job["layout"] == "defaults" else layout_keys),  # defaults: none given, as a user would
    )
    examples = [TokenizedPair(list(p), list(c), list(r), row=i) for i, (p, c, r) in enumerate(pairs)]
    ranks = setup_distributed()
    tokenizer = models.load_tokenizer(cfg.model)
    policy = models.load_model(cfg.model)
    cfg = resolve_layout(cfg, policy)  # as dpokit.dpo does: logprob_chunk_size 0 -> sized from the vocabulary
    models.disable_dropout(policy)
    reference = copy.deepcopy(policy).to(ranks.device)
    t0 = time.perf_counter()
    if cfg.precompute_ref_log_probs:  # as dpokit.dpo's first run: fingerprint, compute, write to an empty cache
        os.environ["DPOKIT_CACHE"] = str(work / "cache")
        refcache.attach_reference_logps(
            reference, examples, cfg, tokenizer.pad_token_id, ranks.device, use_disk_cache=True
        )
        reference = None
    else:
        reference.requires_grad_(False).eval()
    precompute_s = time.perf_counter() - t0
    if cfg.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    clock, losses, seen = StepClock(job["device"]), [], []

    class TimedStep(dpo_step.DPOStep):
        def __call__(self, model, batch):
            clock.start()
            out = super().__call__(model, batch)
            losses.append(out[0].detach().mean())
            return out

        def after_optimizer_step(self, step_no, model):
            super().after_optimizer_step(step_no, model)
            clock.end()

    layout = collate_for(layout_name(cfg.padding_free, cfg.prefix_sharing), tokenizer.pad_token_id)

    def collate(batch_pairs):
        seen.append([p.row for p in batch_pairs])
        return dpo_step.collate_with_reference(batch_pairs, layout)

    reset_peak_memory(job["device"])
    loop.train(cfg, policy, TimedStep(reference, cfg), examples, [], collate, ranks, save_fn=None)
    wall, cpu = clock.durations()
    return {
        "durations": wall,
        "cpu_durations": cpu,
        "losses": [float(x) for x in losses],
        "order": seen,
        "precompute_s": precompute_s,
        "layout": layout_name(cfg.padding_free, cfg.prefix_sharing),
    }


def run_trl(job: dict, pairs: list, work: Path) -> dict:
    """TRL's DPOTrainer on the same token ids, batches and order (see the module docstring)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    order = [i for batch in job["order"] for i in batch]
    data = datasets.Dataset.from_dict(
        {
            "prompt_ids": [pairs[i][0] for i in order],
            "chosen_ids": [pairs[i][1] for i in order],
            "rejected_ids": [pairs[i][2] for i in order],
            "row": order,
        }
    )
    clock, losses, seen = StepClock(job["device"]), [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.end()

    class Collator(DataCollatorForPreference):
        def torch_call(self, examples):
            seen.append([e["row"] for e in examples])
            return super().torch_call(examples)

    class AlignedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already dpokit's token ids

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                losses.append(loss.detach())
            return loss

    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(work / "out"),
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        max_steps=job["steps"],
        per_device_train_batch_size=job["batch"],
        gradient_accumulation_steps=1,
        learning_rate=job["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        beta=job["beta"],
        loss_type=["sigmoid"],
        bf16=job["precision"] == "bf16",
        fp16=False,
        gradient_checkpointing=job["gc"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        precompute_ref_log_probs=job.get("precompute", False),
        precompute_ref_batch_size=job["batch"],
        max_length=None,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        logging_steps=10,
        seed=job["seed"],
        disable_dropout=True,
        use_cpu=job["device"] == "cpu",
        disable_tqdm=True,
    )
    collator = Collator(pad_token_id=tokenizer.pad_token_id)
    t0 = time.perf_counter()
    trainer = AlignedDPOTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[Clock()],
    )
    precompute_s = time.perf_counter() - t0 if job.get("precompute") else 0.0
    seen.clear()  # the precompute pass's batches
    reset_peak_memory(job["device"])
    trainer.train()
    wall, cpu = clock.durations()
    return {
        "durations": wall,
        "cpu_durations": cpu,
        "losses": [float(x) for x in losses],
        "order": seen,
        "precompute_s": precompute_s,
        "layout": "padded",
    }


def child(job_file: str):
    """Entry point of one configuration's subprocess: run it, write its measurements next to the job."""
    job = json.loads(Path(job_file).read_text())
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    import transformers  # noqa: F401  (the libraries' own memory, before any model: reported as the baseline)

    if job["framework"] == "trl":
        import trl  # noqa: F401
    baseline = rss_mib()
    torch.manual_seed(job["seed"])
    pairs = [tuple(map(list, p)) for p in json.loads(Path(job["data"]).read_text())]
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        result = (run_trl if job["framework"] == "trl" else run_dpokit)(job, pairs, Path(tmp))
    result["peak_memory_mib"] = peak_memory_mib(job["device"])
    result["process_peak_mib"] = process_peak_mib(job["device"])
    result["rss_after_imports_mib"] = baseline
    if result["order"] != job["order"]:
        raise SystemExit(f"{job['name']}: batches {result['order'][:3]}... are not dpokit's {job['order'][:3]}...")
    Path(job["result"]).write_text(json.dumps(result))


# --- orchestration -----------------------------------------------------------------------------------


def run_job(job: dict, work: Path, timeout: int) -> dict:
    """One configuration in a fresh interpreter (its own peak memory); its measurements, or {'error': ...}."""
    tag = "".join(ch if ch.isalnum() else "_" for ch in job["name"]) + ("_gc" if job["gc"] else "")
    job_file = work / f"{tag}.job.json"
    job["result"] = str(work / f"{tag}.result.json")
    job_file.write_text(json.dumps(job))
    t0 = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(job_file)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    result = json.loads(Path(job["result"]).read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def summarise(job, result, pairs, shape, backbone_params, peak, warmup) -> dict:
    row = {
        "name": job["name"],
        "framework": job["framework"],
        "gc": job["gc"],
        "precompute": job.get("precompute", False),
    }
    if "error" in result:
        return {**row, "error": result["error"]}
    n = len(result["durations"])
    timed = list(range(min(warmup, n - 1), n))
    batches = [[pairs[i] for i in job["order"][k]] for k in timed]
    wall = sum(result["durations"][k] for k in timed)
    cpu = sum(result["cpu_durations"][k] for k in timed)
    tokens = sum(2 * len(p) + len(c) + len(r) for batch in batches for p, c, r in batch)
    shared = result["layout"].startswith("prefix_shared")
    flops = sum(step_flops(b, shape, backbone_params, shared, row["precompute"]) for b in batches)
    return {
        **row,
        "layout": result["layout"],
        "timed_steps": len(timed),
        "step_s": statistics.median(result["durations"][k] for k in timed),
        "cpu_step_s": statistics.median(result["cpu_durations"][k] for k in timed),
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / cpu,
        "mfu": flops / wall / peak,
        "peak_memory_mib": result["peak_memory_mib"],
        "process_peak_mib": result.get("process_peak_mib"),
        "rss_after_imports_mib": result["rss_after_imports_mib"],
        "precompute_s": result["precompute_s"],
        "losses": result["losses"],
        "wall_s": result["wall_s"],
        "step_times": result["durations"],
        "cpu_step_times": result["cpu_durations"],
    }


def best_of(rows: list) -> dict:
    """Of repeated runs of one configuration, the fastest (the one least disturbed by other processes)."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return rows[-1]
    best = dict(min(ok, key=lambda r: r["step_s"]))
    best["repeats_step_s"] = [r["step_s"] for r in ok]
    best["repeats_cpu_step_s"] = [r["cpu_step_s"] for r in ok]
    return best


def loss_gaps(rows: list) -> None:
    """Each row's largest per-step loss difference from TRL with the same checkpointing setting (and, for
    dpokit, the same reference setting; TRL's precomputed run is compared with TRL's plain one)."""
    for row in rows:
        baseline = row["framework"] == "trl"
        ref = next(
            (
                r
                for r in rows
                if r["framework"] == "trl"
                and r["gc"] == row["gc"]
                and "losses" in r
                and r["precompute"] == (row["precompute"] and not baseline)
            ),
            None,
        )
        if ref is None or ref is row or "losses" not in row:
            continue
        n = min(PARITY_STEPS, len(row["losses"]), len(ref["losses"]))
        row["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(row["losses"][:n], ref["losses"][:n]))
        row["loss_steps_compared"] = n


def ratio(row, base, key):
    return row[key] / base[key] if base and key in base and key in row and base[key] else float("nan")


def main_table(rows: list) -> str:
    lines = [
        "| configuration | grad ckpt | layout | step s | CPU s/step | tokens/s | vs TRL | vs TRL (CPU time) "
        "| peak MiB | vs TRL | MFU | ref precompute s | max abs loss diff vs TRL (steps) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        gc = "on" if row["gc"] else "off"
        if "error" in row:
            lines.append(f"| {row['name']} | {gc} | failed: {row['error'][:80]} |" + " |" * 10)
            continue
        base = next(
            (
                r
                for r in rows
                if r["framework"] == "trl" and r["gc"] == row["gc"] and not r["precompute"] and "error" not in r
            ),
            None,
        )
        diff = f"{row['loss_max_abs_diff']:.1e} ({row['loss_steps_compared']})" if "loss_max_abs_diff" in row else ""
        lines.append(
            f"| {row['name']} | {gc} | {row['layout']} | {row['step_s']:.2f} | {row['cpu_step_s']:.2f} "
            f"| {row['tokens_per_s']:,.0f} | {ratio(row, base, 'tokens_per_s'):.2f}x "
            f"| {ratio(row, base, 'tokens_per_cpu_s'):.2f}x | {row['peak_memory_mib']:,.0f} "
            f"| {ratio(row, base, 'peak_memory_mib'):.2f}x | {100 * row['mfu']:.1f}% "
            f"| {row['precompute_s']:.1f} | {diff or '(baseline)'} |"
        )
    return "\n".join(lines)


def scaling_table(rows: list) -> str:
    lines = [
        "| sweep | seq len | batch | framework | step s | CPU s/step | tokens/s | peak MiB | MFU "
        "| dpokit/TRL tokens/s | dpokit/TRL tokens/CPU s | dpokit/TRL peak |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        head = f"| {row['sweep']} | {row['seq_len']} | {row['batch']} | {row['name']} |"
        if "error" in row:
            lines.append(f"{head} failed: {row['error'][:60]} |" + " |" * 7)
            continue
        trl = next(
            (
                r
                for r in rows
                if r["sweep"] == row["sweep"]
                and r["seq_len"] == row["seq_len"]
                and r["batch"] == row["batch"]
                and r["framework"] == "trl"
                and "error" not in r
            ),
            None,
        )
        rel = " | | "
        if row["framework"] == "dpokit" and trl:
            rel = (
                f"{ratio(row, trl, 'tokens_per_s'):.2f}x | {ratio(row, trl, 'tokens_per_cpu_s'):.2f}x "
                f"| {ratio(row, trl, 'peak_memory_mib'):.2f}x"
            )
        lines.append(
            f"{head} {row['step_s']:.2f} | {row['cpu_step_s']:.2f} | {row['tokens_per_s']:,.0f} "
            f"| {row['peak_memory_mib']:,.0f} | {100 * row['mfu']:.1f}% | {rel} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default="default", help=f"'default' (embedded SmolLM2-135M) or one of {', '.join(ARCHS)}"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--steps", type=int, default=20, help="optimizer steps per configuration (>= 20 for the loss check)"
    )
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the timings")
    ap.add_argument(
        "--batch", type=int, default=None, help="pairs per step, both frameworks (default: 2 on CPU, 8 on GPU)"
    )
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 where the device computes it natively, else fp32 (dpokit's rule)",
    )
    ap.add_argument(
        "--scale",
        type=float,
        default=None,
        help="multiply every length of the length distribution (default: 0.2 on CPU, 1 on GPU)",
    )
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate (large enough that the loss moves)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every configuration this many times, interleaved, and keep the fastest (on a shared machine)",
    )
    ap.add_argument(
        "--chunk-size", type=int, default=1024, help="dpokit's logprob_chunk_size in its fast configuration"
    )
    ap.add_argument(
        "--fast-layout",
        default=None,
        choices=["packed", "prefix_shared", "prefix_shared_packed"],
        help="dpokit's layout in its fast configuration (default: prefix_shared_packed on CPU, where it "
        "measured fastest; prefix_shared on GPU, where one (L, L) mask over a whole packed batch would "
        "make sdpa attend across all of it)",
    )
    ap.add_argument("--gc", default="off,on", help="gradient checkpointing settings of the main table")
    ap.add_argument(
        "--configs",
        default=None,
        help="only these configurations of the main table, by name, comma-separated (e.g. 'TRL,dpokit defaults': "
        "the headline alone)",
    )
    ap.add_argument(
        "--seq-lens",
        default=None,
        help="scaling sweep over sequence length at batch 1 (CPU) / --batch "
        "(GPU) (default: 256,512,1024 on CPU; 256,...,4096 on GPU); empty to skip",
    )
    ap.add_argument(
        "--batches",
        default=None,
        help="scaling sweep over batch size at sequence length 256 (CPU) / "
        "1024 (GPU) (default: 1,2,4 on CPU; 1,2,4,8,16 on GPU); empty to skip",
    )
    ap.add_argument("--scaling-steps", type=int, default=3, help="steps per scaling point (the first is not timed)")
    ap.add_argument(
        "--scaling-trl", action=argparse.BooleanOptionalAction, default=True, help="run TRL at every scaling point too"
    )
    ap.add_argument("--skip-main", action="store_true", help="only the scaling sweeps")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per configuration before it counts as failed")
    ap.add_argument("--work", default=None, help="directory for the model and data files (default: a temp dir)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument(
        "--world",
        type=int,
        default=None,
        help="instead: ddp against fsdp on this many CPU processes (bench/world.py: tokens/s, peak memory per rank)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args.child)
    if args.world:  # a separate benchmark, its own file: dpokit alone, no TRL
        sys.path.insert(0, str(Path(__file__).parent))
        import world

        return world.main(["--world", str(args.world), "--out", args.out])
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install trl (it is not a dpokit dependency)") from None
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpokit import models
    from dpokit.precision import resolve as resolve_precision

    cpu = args.device == "cpu"
    scale = args.scale if args.scale is not None else (0.2 if cpu else 1.0)
    batch = args.batch or (2 if cpu else 8)
    fast_layout = args.fast_layout or ("prefix_shared_packed" if cpu else "prefix_shared")
    seq_lens = args.seq_lens if args.seq_lens is not None else ("256,512,1024" if cpu else "256,512,1024,2048,4096")
    batches = args.batches if args.batches is not None else ("1,2,4" if cpu else "1,2,4,8,16")
    work = Path(args.work or tempfile.mkdtemp(prefix="vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model_dir = prepare_model(args.model, work, args.seed)
    tokenizer = models.load_tokenizer(str(model_dir))
    config = AutoConfig.from_pretrained(model_dir)
    shape = shape_of(config)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    embeddings = {id(p) for m in (meta.get_input_embeddings(), meta.get_output_embeddings()) for p in m.parameters()}
    backbone_params = sum(p.numel() for p in meta.parameters() if id(p) not in embeddings)
    # both frameworks get the same concrete precision: dpokit's `auto` rule, resolved once here
    args.precision = resolve_precision(args.precision, args.device)
    peak = matmul_peak(args.device, args.precision)
    info = {
        "device": device_name(args.device),
        "model": args.model,
        "model_dir": str(model_dir),
        "backbone_params": backbone_params,
        "shape": shape,
        "precision": args.precision,
        "matmul_peak_tflops": peak / 1e12,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "threads": torch.get_num_threads(),
        "command": "python bench/vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(f"device: {info['device']}; measured {args.precision} matmul peak {peak / 1e12:.3f} TFLOP/s", flush=True)

    common = {
        "model_dir": str(model_dir),
        "device": args.device,
        "precision": args.precision,
        "lr": args.lr,
        "beta": args.beta,
        "seed": args.seed,
        "chunk_size": args.chunk_size,
        "fast_layout": fast_layout,
        "threads": args.threads,
    }
    results = {
        "info": info,
        "settings": {**vars(args), "scale": scale, "batch": batch, "fast_layout": fast_layout},
        "main": [],
        "scaling": [],
    }

    def save():
        (out / "vs_trl.json").write_text(json.dumps(results, indent=1))

    if not args.skip_main:
        n = max(64, args.steps * batch)
        pairs = synthetic_pairs(tokenizer, n, args.seed, scale)
        data_file = work / "pairs.json"
        data_file.write_text(json.dumps(pairs))
        order = batch_order(n, batch, args.steps, args.seed)
        lengths = {k: [len(p[i]) for p in pairs] for i, k in enumerate(("prompt", "chosen", "rejected"))}
        info["data"] = {
            k: {"mean": float(np.mean(v)), "median": float(np.median(v)), "min": min(v), "max": max(v)}
            for k, v in lengths.items()
        }
        jobs = [
            {
                **common,
                **opts,
                "framework": framework,
                "name": name,
                "gc": gc,
                "steps": args.steps,
                "batch": batch,
                "data": str(data_file),
                "order": order,
            }
            for gc in [s.strip() == "on" for s in args.gc.split(",") if s.strip()]
            for framework, name, opts in CONFIGS
            if args.configs is None or name in [c.strip() for c in args.configs.split(",")]
        ]
        runs = [[] for _ in jobs]
        for r in range(args.repeats):
            for job, done in zip(jobs, runs):
                print(
                    f"main: {job['name']}, gradient checkpointing {'on' if job['gc'] else 'off'} "
                    f"(run {r + 1} of {args.repeats}) ...",
                    flush=True,
                )
                done.append(
                    summarise(job, run_job(job, work, args.timeout), pairs, shape, backbone_params, peak, args.warmup)
                )
                results["main"] = [best_of(d) for d in runs if d]
                loss_gaps(results["main"])
                save()

    sweeps = [("seq len", int(s), 1 if cpu else batch) for s in seq_lens.split(",") if s.strip()]
    sweeps += [("batch", 256 if cpu else 1024, int(b)) for b in batches.split(",") if b.strip()]
    frameworks = [("dpokit", "dpokit fast", {"layout": "fast"})] + ([("trl", "TRL", {})] if args.scaling_trl else [])
    for sweep, seq_len, b in sweeps:
        pairs = synthetic_pairs(tokenizer, args.scaling_steps * b, args.seed, 1.0, fixed_length=seq_len)
        data_file = work / f"pairs_{seq_len}_{b}.json"
        data_file.write_text(json.dumps(pairs))
        order = batch_order(len(pairs), b, args.scaling_steps, args.seed)
        for framework, name, opts in frameworks:
            job = {
                **common,
                **opts,
                "framework": framework,
                "name": f"{name} {seq_len}x{b}",
                "gc": False,
                "steps": args.scaling_steps,
                "batch": b,
                "data": str(data_file),
                "order": order,
            }
            print(f"scaling: {name}, sequence length {seq_len}, batch {b} ...", flush=True)
            row = summarise(job, run_job(job, work, args.timeout), pairs, shape, backbone_params, peak, 1)
            results["scaling"].append({**row, "name": name, "sweep": sweep, "seq_len": seq_len, "batch": b})
            save()

    text = report(results, args, scale, batch)
    (out / "vs_trl.md").write_text(text)
    save()
    print(text)


def report(results, args, scale, batch) -> str:
    info = results["info"]
    lines = [
        f"# dpokit vs TRL {info['trl']} ({args.device})",
        "",
        f"- command: `{info['command']}`",
        f"- device: {info['device']}; measured {args.precision} matmul peak "
        f"{info['matmul_peak_tflops']:.3f} TFLOP/s with {info['threads']} threads",
        f"- model: {args.model} ({info['backbone_params'] / 1e6:.0f}M non-embedding parameters, vocab "
        f"{info['shape']['vocab']}); {args.precision}; torch {info['torch']}, transformers {info['transformers']}",
        f"- {batch} pairs per step, {args.steps} steps, timed: steps {args.warmup + 1}..{args.steps}, lr {args.lr}, "
        f"beta {args.beta}, length scale {scale}, best of {args.repeats} run(s) per configuration",
    ]
    if "data" in info:
        lines.append(
            "- lengths in tokens (mean / median / min-max): "
            + "; ".join(
                f"{k} {v['mean']:.0f} / {v['median']:.0f} / {v['min']}-{v['max']}" for k, v in info["data"].items()
            )
        )
    if results["main"]:
        rows = {r["name"]: r for r in results["main"] if not r["gc"] and "error" not in r}
        ours, theirs = (rows.get(name) for name in HEADLINE)
        if ours and theirs:
            lines += [
                "",
                f"**Headline: dpokit with its defaults ({ours['layout']}) trains at "
                f"{ratio(ours, theirs, 'tokens_per_s'):.2f}x the tokens per second of TRL's DPOTrainer with its "
                f"defaults ({ratio(ours, theirs, 'tokens_per_cpu_s'):.2f}x in CPU time), at "
                f"{ratio(ours, theirs, 'peak_memory_mib'):.2f}x its peak memory.**",
            ]
        lines += ["", main_table(results["main"])]
    if results["scaling"]:
        lines += [
            "",
            f"Scaling (no gradient checkpointing; every sequence the stated length: prompt half of it, "
            f"each response the other half; {args.scaling_steps} steps, the first not timed):",
            "",
            scaling_table(results["scaling"]),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
