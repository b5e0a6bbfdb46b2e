"""The DPO-versus-RL frontier sweep of issue 16 (docs/frontier.md), incremental across sittings and machines.

Runs (seed S, default 0), each trained, then every checkpoint evaluated on the same 220 held-out prompts:

  pairs                        DPO's preference pairs, sampled from pi_ref with the evaluation's sampler
                               (`dpokit generate` 2 per training prompt, then `dpokit pairs reward=vader`)
  dpo-beta{0.1,0.5,2}          `dpokit dpo`, ~one epoch of those pairs, 5 checkpoints      (configs/sweep/dpo.yaml)
  rloo-target{1.3,2.7,4.4}     `dpokit rl` RLOO on VADER, adaptive KL towards each target    (configs/sweep/rloo.yaml)
  ppo-target2.7                `dpokit rl` PPO with the value head's own lr and a critic warm-up
  rm, rloo-rm-target2.7        `dpokit rm` on the same pairs, then RLOO on that reward model
  reference                    pi_ref against itself: the reference's samples, cached for every eval

The reference and the pairs do not depend on the seed: they live beside the seeds' results
(results/../reference-cache, results/../pairs) and are made once. Training starts at once; a run's
evaluations wait until the reference's cache is written.

Small results are written under --results (default examples/sentiment/results/seed<S>/, committed):
per run `run.json` (the exact commands, wall times, machine), per checkpoint `eval.json` and the
checkpoint's `trainer_state.json` (what `dpokit frontier` reads to tell method, setting and step).
Checkpoints go under --out (not committed; once a run's evaluations are written only its newest
checkpoint stays, unless --keep-checkpoints). A run whose run.json says done is skipped; a run
interrupted mid-way resumes from its newest checkpoint (resume=auto) if --out still holds it, and
evaluations already in --results are not redone. Then `dpokit frontier` redraws the picture and the
verdict from --results.

    OMP_NUM_THREADS=1 .venv/bin/python examples/sentiment/sweep.py                # seed 0, two workers
    .venv/bin/python examples/sentiment/sweep.py --seed 1                          # the second seed
    .venv/bin/python examples/sentiment/sweep.py --dry-run                         # the plan, what is done
    .venv/bin/python examples/sentiment/sweep.py --times                           # finished runs' wall times
    .venv/bin/python examples/sentiment/sweep.py --smoke --model DIR --out T --results T/results

Two workers run two runs at once, each a single-threaded process (OMP_NUM_THREADS=1): on a small CPU
two single-thread processes get more done than one two-thread process (small matrices, sampling).
--smoke: the same plan at toy sizes (a few steps, 4 prompts, a few tokens) for testing the driver.
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.io import atomic_write_text

HERE = Path(__file__).resolve().parent
CONFIGS = Path(os.path.relpath(HERE / "configs" / "sweep"))

BETAS = [0.1, 0.5, 2.0]
# (initial kl_coef, target KL in nats): the adaptive controller steers each run to its target
KL_TARGETS = [(0.2, 1.3), (0.1, 2.7), (0.05, 4.4)]

# DPO's pairs: pi_ref's samples drawn exactly as the evaluation draws them (temperature 1, top_p 1, top-k off,
# 48 new tokens, fp32), two per training prompt, the better by VADER chosen; unfinished responses kept (the
# evaluation and RL see them too), exact ties dropped
GENERATE = [
    "generate",
    "dataset=data/sentiment/train.jsonl",
    "num_samples_per_prompt=2",
    "max_new_tokens=48",
    "max_prompt_length=96",
    "temperature=1.0",
    "top_p=1.0",
    "top_k=0",
    "precision=fp32",
    "seed=0",
]
PAIRS = ["pairs", "reward=vader", "pairing=best_vs_worst", "drop_unfinished=false", "seed=0"]

# order in which runs start (two at a time): one long RL run early, the reward model before the runs that need it
ORDER = [
    "pairs",
    "reference",
    "rloo-target4.4",
    "dpo-beta0.1",
    "dpo-beta0.5",
    "dpo-beta2",
    "rm",
    "rloo-target1.3",
    "rloo-target2.7",
    "ppo-target2.7",
    "rloo-rm-target2.7",
]

# --smoke: toy sizes for every stage (seconds per run on a tiny model)
SMOKE = {
    "generate": ["max_prompts=16", "max_new_tokens=8"],
    # a tiny random model's words carry no sentiment (VADER ties them all): its pairs are labelled by length
    "pairs": ["reward=sweep:smoke_reward"],
    "dpo": ["max_steps=2", "save_steps=1", "per_device_train_batch_size=2", "warmup_steps=0", "max_length=64"],
    "rl": [
        "max_steps=2",
        "save_steps=1",
        "per_device_train_batch_size=2",
        "num_samples_per_prompt=2",
        "max_new_tokens=4",
        "warmup_steps=0",
    ],
    "rm": ["max_steps=2", "per_device_train_batch_size=2", "max_length=64"],
    "eval": ["num_samples=4", "max_new_tokens=4", "reference_samples_per_prompt=2", "per_device_eval_batch_size=4"],
}


def smoke_reward(prompts, responses) -> list:
    """--smoke's reward for labelling pairs: the response's length in characters / 100."""
    return [len(r) / 100 for r in responses]


@dataclass
class Run:
    name: str
    train: list  # `dpokit` arguments, or [] for the reference's evaluation
    needs: list = field(default_factory=list)  # runs that must be done first
    evaluate: bool = True  # evaluate its checkpoints (the reward model is not a policy)


def pairs_file(args) -> Path:
    """Beside the seeds' results; relative to the working directory (commands recorded stay portable)."""
    return Path(os.path.relpath(Path(args.results).parent / "pairs" / "train.jsonl"))


def plan(args) -> list:
    out, model, seed = Path(args.out), args.model, args.seed
    smoke = args.smoke
    common = [f"model={model}", f"seed={seed}", "resume=auto"]
    data = f"dataset={pairs_file(args)}"
    runs = [Run("pairs", [], evaluate=False), Run("reference", [])]
    for beta in BETAS:
        name = f"dpo-beta{beta:g}"
        dpo = [
            "dpo",
            "--config",
            str(CONFIGS / "dpo.yaml"),
            *common,
            data,
            f"beta={beta:g}",
            f"output_dir={out / name}",
        ]
        runs.append(Run(name, dpo + (SMOKE["dpo"] if smoke else []), needs=["pairs"]))
    rl = ["rl", "--config", str(CONFIGS / "rloo.yaml"), *common] + (SMOKE["rl"] if smoke else [])
    for coef, target in KL_TARGETS:
        name = f"rloo-target{target:g}"
        runs.append(Run(name, [*rl, f"kl_coef={coef:g}", f"target_kl={target:g}", f"output_dir={out / name}"]))
    coef, target = KL_TARGETS[1]
    name = f"ppo-target{target:g}"
    ppo = ["algorithm=ppo", "value_lr=1e-4", "critic_warmup_steps=" + ("1" if smoke else "10"), "lam=1.0"]
    runs.append(Run(name, [*rl, *ppo, f"kl_coef={coef:g}", f"target_kl={target:g}", f"output_dir={out / name}"]))
    rm = ["rm", "--config", str(CONFIGS / "rm.yaml"), *common, data, f"output_dir={out / 'rm'}"]
    runs.append(Run("rm", rm + (SMOKE["rm"] if smoke else []), needs=["pairs"], evaluate=False))
    name = f"rloo-rm-target{target:g}"
    learned = [f"reward=rm:{out / 'rm'}", f"kl_coef={coef:g}", f"target_kl={target:g}", f"output_dir={out / name}"]
    runs.append(Run(name, [*rl, *learned], needs=["rm"]))
    return sorted(runs, key=lambda r: ORDER.index(r.name))


def machine() -> str:
    """Host name, CPU model and core count (GPU name if any): what the run's wall times were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    except ImportError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores{gpu}"


def checkpoints(run_dir: Path) -> list:
    found = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def prune(run_dir: Path):
    """Drop the optimizer state (and rollouts) of every checkpoint but the newest: evaluation needs only the
    weights, and at twice their size 40 optimizer states of the 135M model would fill the disk."""
    for ckpt in checkpoints(run_dir)[:-1]:
        for name in ("optimizer.pt", "rollouts.pt"):
            (ckpt / name).unlink(missing_ok=True)


class Sweep:
    def __init__(self, args):
        self.args = args
        # relative to the working directory: the commands recorded in run.json stay valid on another machine
        self.out, self.results = Path(args.out), Path(os.path.relpath(args.results))
        self.cache = self.results.parent / "reference-cache"  # shared by the seeds: the same reference
        self.lock = threading.Lock()
        self.reference_ready = threading.Event()  # set once the reference's cache is written (or failed)
        self.reference_failed = False

    def result_dir(self, run: Run) -> Path:
        return pairs_file(self.args).parent if run.name == "pairs" else self.results / run.name

    def record_path(self, run: Run) -> Path:
        return self.result_dir(run) / "run.json"

    def done(self, run: Run) -> bool:
        """run.json says done; for the reward model also its weights are here (the learned-reward run reads
        them, and they are not committed: on another machine the reward model is trained again)."""
        path = self.record_path(run)
        if not (path.is_file() and json.loads(path.read_text()).get("done", False)):
            return False
        return run.name != "rm" or (self.out / run.name / "config.json").is_file()

    def call(self, run: Run, args: list, log: Path) -> tuple:
        """`dpokit ARGS` in a single-threaded process, its output in `log` -> (shown command, seconds)."""
        shown = "dpokit " + " ".join(shlex.quote(a) for a in args)
        self.say(f"[{run.name}] {shown}")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.args.smoke:  # smoke_reward is imported from this file as `sweep:smoke_reward`
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        t0 = time.perf_counter()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            cmd = [sys.executable, "-m", "dpokit.cli", *args]
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        seconds = round(time.perf_counter() - t0, 1)
        if rc != 0:
            raise RuntimeError(f"[{run.name}] exit code {rc} after {seconds:.0f} s: {shown} (log: {log})")
        return shown, seconds

    def say(self, text: str):
        with self.lock:
            print(text, flush=True)

    def eval_args(self, model, output_file) -> list:
        return [
            "eval",
            "--config",
            str(CONFIGS / "eval.yaml"),
            f"model={model}",
            f"ref_model={self.args.model}",
            f"reference_cache={self.cache}",
            f"output_file={output_file}",
        ] + (SMOKE["eval"] if self.args.smoke else [])

    def execute(self, run: Run):
        """Train (resuming), then evaluate every checkpoint not yet in results; record run.json (written as
        the run goes, with done false, so that an interrupted run's times and commands are kept and summed
        when it resumes)."""
        res = self.result_dir(run)
        record = {"run": run.name, "seed": self.args.seed, "machine": machine(), "commands": [], "seconds": {}}
        earlier = json.loads(self.record_path(run).read_text()) if self.record_path(run).is_file() else {}
        if earlier and not earlier.get("done"):  # an earlier, interrupted invocation of this run
            # (a done run redone, the reward model on a machine without its weights, starts a new record)
            machines = {earlier.get("machine"), record["machine"]}
            record.update(commands=earlier.get("commands", []), seconds=earlier.get("seconds", {}))
            record["machine"] = " + ".join(sorted(m for m in machines if m))
            record["invocations"] = earlier.get("invocations", 1) + 1
        log = self.out / "logs" / f"{run.name}.log"

        def note(shown, key, seconds):  # one more command done: record it (its time summed with earlier ones)
            record["commands"].append(shown)
            record["seconds"][key] = round(record["seconds"].get(key, 0.0) + seconds, 1)
            res.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.record_path(run), json.dumps({**record, "done": False}, indent=1) + "\n")

        if run.name == "pairs":  # pi_ref's samples with the evaluation's sampler, labelled into pairs
            res.mkdir(parents=True, exist_ok=True)
            samples = res / "samples.jsonl"
            smoke = self.args.smoke
            generate = [*GENERATE, f"model={self.args.model}", f"output_file={samples}"]
            label = [*PAIRS, f"samples={samples}", f"output={res / 'train.jsonl'}"]  # (written atomically)
            for name, args in (
                ("generate", generate + (SMOKE["generate"] if smoke else [])),
                ("pairs", label + (SMOKE["pairs"] if smoke else [])),
            ):
                shown, s = self.call(run, args, log)
                note(shown, name, s)
            record["pairs"] = sum(1 for _ in open(res / "train.jsonl"))
        elif not run.train:  # the reference against itself: its samples and rewards, cached for every eval
            try:
                res.mkdir(parents=True, exist_ok=True)  # (`dpokit eval` writes only into a directory that exists)
                shown, s = self.call(run, self.eval_args(self.args.model, res / "eval.json"), log)
                if not (res / "eval.json").is_file():
                    raise RuntimeError(f"[{run.name}] wrote no {res / 'eval.json'}")
            except BaseException:
                self.reference_failed = True
                raise
            finally:
                self.reference_ready.set()
            note(shown, "eval", s)
        else:
            shown, s = self.call(run, run.train, log)
            note(shown, "train", s)
            run_dir = self.out / run.name
            prune(run_dir)
            found = checkpoints(run_dir) if run.evaluate else []
            if run.evaluate and not found:
                raise RuntimeError(f"[{run.name}] {run_dir}: no checkpoints to evaluate")
            if found:  # every evaluation reads the reference's side from its cache
                self.reference_ready.wait()
                if self.reference_failed:
                    raise RuntimeError(f"[{run.name}] trained, not evaluated: the reference's evaluation failed")
            for ckpt in found:
                target = res / ckpt.name
                if (target / "eval.json").is_file():
                    continue
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(ckpt / "trainer_state.json", target / "trainer_state.json")
                shown, s = self.call(run, self.eval_args(ckpt, target / "eval.json.tmp"), log)
                os.replace(target / "eval.json.tmp", target / "eval.json")  # present only when complete
                # (os.replace raises if the eval wrote nothing: the run is then not marked done)
                note(shown, f"eval {ckpt.name}", s)
            record["checkpoints"] = [c.name for c in found]
            if not self.args.keep_checkpoints:  # evaluated: the results hold what the frontier needs
                for ckpt in found[:-1]:  # (the newest stays: the run can still be resumed or extended)
                    shutil.rmtree(ckpt)
        record["done"] = True
        res.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.record_path(run), json.dumps(record, indent=1) + "\n")
        self.say(f"[{run.name}] done in {sum(record['seconds'].values()) / 60:.1f} min")

    def run_all(self, runs: list) -> list:
        """Every run not yet done, on `workers` workers, in ORDER, a run starting once the runs it needs
        are done (evaluations also wait for the reference's cache: Sweep.execute)."""
        todo = [r for r in runs if not self.done(r)]
        for r in runs:
            if r not in todo:
                self.say(f"[{r.name}] done before ({self.record_path(r)}); skipped")
        if not any(r.name == "reference" for r in todo):
            self.reference_ready.set()
        failed = []
        finished = {r.name for r in runs if self.done(r)}
        with ThreadPoolExecutor(self.args.workers) as pool:
            running = {}
            while todo or running:
                for r in list(todo):
                    if len(running) < self.args.workers and all(n in finished for n in r.needs):
                        todo.remove(r)
                        running[pool.submit(self.execute, r)] = r
                if not running:  # what is left waits on a run that failed
                    failed += [f"[{r.name}] not run: needs {', '.join(r.needs)}" for r in todo]
                    break
                complete, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in complete:
                    r = running.pop(fut)
                    if fut.exception() is not None:
                        failed.append(str(fut.exception()))
                        self.say(f"[{r.name}] FAILED: {fut.exception()}")
                    else:
                        finished.add(r.name)
        return failed


def wall_times(sweep: Sweep, runs: list) -> str:
    """The finished runs' wall times from their run.json: training, evaluations (count, total), all."""
    lines = [
        "| run | machine | training | evaluations | total |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    total = 0.0
    for r in runs:
        if not sweep.record_path(r).is_file():
            lines.append(f"| {r.name} | | not run yet | | |")
            continue
        rec = json.loads(sweep.record_path(r).read_text())
        if not rec.get("done"):
            so_far = sum(rec["seconds"].values()) / 60
            lines.append(f"| {r.name} | {rec.get('machine', '')} | interrupted after {so_far:.1f} min | | |")
            continue
        secs = rec["seconds"]
        evals = [v for k, v in secs.items() if k.startswith("eval")]
        train = sum(v for k, v in secs.items() if not k.startswith("eval"))
        run_total = sum(secs.values())
        total += run_total
        ev = f"{len(evals)} x {sum(evals) / len(evals) / 60:.1f} = {sum(evals) / 60:.1f} min" if evals else ""
        tr = f"{train / 60:.1f} min" if train else ""
        lines.append(f"| {r.name} | {rec.get('machine', '')} | {tr} | {ev} | {run_total / 60:.1f} min |")
    lines.append(f"| **all finished runs** | | | | **{total / 3600:.2f} h** (one core each) |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="training seed of every run (evaluation keeps seed 0)")
    p.add_argument("--model", default="default", help="pi_ref and every starting policy")
    p.add_argument("--out", default="runs/sweep", help="checkpoints and logs (not committed)")
    p.add_argument("--results", help="small results (default: examples/sentiment/results/seed<S>)")
    p.add_argument("--workers", type=int, default=2, help="runs at once, each single-threaded")
    p.add_argument("--only", action="append", default=[], help="run only these runs (names; repeatable)")
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every evaluated checkpoint (default: a run keeps only its newest once its evals are written)",
    )
    p.add_argument("--smoke", action="store_true", help="toy sizes, for testing the driver on a tiny model")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what is done; run nothing")
    p.add_argument("--times", action="store_true", help="print the finished runs' wall times (markdown); run nothing")
    args = p.parse_args(argv)
    args.out = str(Path(args.out) / f"seed{args.seed}")
    args.results = args.results or str(HERE / "results" / f"seed{args.seed}")
    return args


def main(argv=None):
    args = parse_args(argv)
    sweep = Sweep(args)
    runs = plan(args)
    if args.only:
        unknown = set(args.only) - {r.name for r in runs}
        if unknown:
            sys.exit(f"--only: no run named {', '.join(sorted(unknown))}; runs: {', '.join(r.name for r in runs)}")
        runs = [r for r in runs if r.name in args.only or r.name in ("pairs", "reference")]
    if args.dry_run:
        for r in runs:
            state = "done" if sweep.done(r) else "to do"
            what = {"pairs": "generate, then dpokit pairs", "reference": "(eval of pi_ref)"}.get(r.name)
            print(f"{r.name:<22} {state:<6} dpokit {what or ' '.join(r.train)}")
        return
    if args.times:
        print(wall_times(sweep, runs))
        return
    t0 = time.perf_counter()
    failed = sweep.run_all(runs)
    title = f"DPO vs RL on controlled sentiment (seed {args.seed})"
    frontier = ["frontier", f"inputs={sweep.results}", "pattern=eval.json", f"output_dir={sweep.results / 'frontier'}"]
    try:
        sweep.call(Run("frontier", []), [*frontier, f"title={title}"], Path(args.out) / "logs" / "frontier.log")
    except RuntimeError as e:
        failed.append(str(e))
    print(f"this invocation: {(time.perf_counter() - t0) / 60:.1f} min; results in {sweep.results}")
    if failed:
        sys.exit("failed:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
