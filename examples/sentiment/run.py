"""The DPO paper's controlled-sentiment experiment, small (Rafailov et al., 2023, section 6.1, Fig. 2 left).

pi_ref = the embedded SmolLM2-135M-Instruct; ground-truth reward = VADER sentiment; preference pairs =
data/sentiment (pi_ref's own samples labelled by VADER). Then

  1. DPO, one run per beta, checkpointing several times          (`dpokit dpo`,  configs/dpo.yaml)
  2. PPO against VADER, one run per kl_coef, checkpointing too    (`dpokit rl`,   configs/ppo.yaml)
  3. every checkpoint against pi_ref on held-out prompts: mean reward and KL(pi || pi_ref) of samples,
     with the same prompts, sampler and seed for all             (`dpokit eval`, configs/eval.yaml)
  4. the reward-versus-KL scatter, one colour per method          (`dpokit frontier`)

Run from the repository root with its venv:

    OMP_NUM_THREADS=1 .venv/bin/python examples/sentiment/run.py            # --scale quick: one CPU core, < 1 h
    .venv/bin/python examples/sentiment/run.py --scale full                # a GPU: the same commands, bigger
    .venv/bin/python examples/sentiment/run.py --dry-run                   # print the commands only

Every stage is one dpokit command, printed before it runs and timed; finished stages are recorded in
OUT/stages.json and skipped when the driver is run again (--force reruns them), and a killed training
run continues from its newest checkpoint (resume=auto). The device is dpokit's choice (CUDA when there is
one), so nothing here changes between a CPU and a GPU except the sizes of --scale.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = Path(os.path.relpath(HERE / "configs"))  # relative to the working directory: shorter commands

# Sizes per scale, as key=value overrides of configs/*.yaml (which hold the "quick" CPU sizes).
SCALES = {
    # seconds on a tiny model: what the tests run
    "smoke": {
        "dpo": ["max_steps=2", "save_steps=1", "per_device_train_batch_size=2", "warmup_steps=0"],
        "ppo": [
            "max_steps=1",
            "save_steps=0",
            "per_device_train_batch_size=2",
            "num_samples_per_prompt=2",
            "max_new_tokens=6",
            "warmup_steps=0",
        ],
        "eval": ["num_samples=4", "max_eval_examples=4", "max_new_tokens=6"],
        "betas": [0.1],
        "kl_coefs": [0.05],
    },
    # one CPU core, under an hour: 3 x 20 DPO steps of 8 pairs, 2 x 10 PPO steps of 4 prompts x 4 samples,
    # 10 evaluations of 32 prompts (the sizes of configs/*.yaml)
    "quick": {"dpo": [], "ppo": [], "eval": [], "betas": [0.05, 0.2, 1.0], "kl_coefs": [0.02, 0.1]},
    # a GPU: longer runs, bigger batches, every held-out prompt, and a third kl_coef
    "full": {
        "dpo": [
            "max_steps=400",
            "save_steps=50",
            "per_device_train_batch_size=32",
            "learning_rate=5e-6",
            "warmup_steps=20",
        ],
        "ppo": [
            "max_steps=400",
            "save_steps=50",
            "per_device_train_batch_size=32",
            "learning_rate=3e-6",
            "max_new_tokens=48",
            "ppo_epochs=4",
            "warmup_steps=20",
        ],
        "eval": ["num_samples=220", "max_eval_examples=220", "max_new_tokens=48", "per_device_eval_batch_size=32"],
        "betas": [0.05, 0.1, 0.5, 2.0],
        "kl_coefs": [0.01, 0.05, 0.2],
    },
}


def floats(text: str) -> list:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scale", choices=list(SCALES), default="quick", help="run sizes (default: quick, for a CPU)")
    p.add_argument("--out", default="runs/sentiment", help="where runs, evaluations and the frontier go")
    p.add_argument("--model", default="default", help="pi_ref and the starting policy (default: the embedded model)")
    p.add_argument("--betas", type=floats, help="DPO betas (comma-separated; default: the scale's)")
    p.add_argument("--kl-coefs", type=floats, help="PPO KL coefficients (comma-separated; default: the scale's)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed of every run (evaluation keeps its own: "
        "configs/eval.yaml, seed 0, the same for every checkpoint)",
    )
    p.add_argument("--skip", choices=["dpo", "ppo"], action="append", default=[], help="leave out a method")
    p.add_argument("--force", action="store_true", help="rerun stages already recorded as done")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


class Stages:
    """Runs dpokit commands one after another, timing each; OUT/stages.json records the finished ones."""

    def __init__(self, out: Path, force: bool, dry_run: bool):
        self.out, self.force, self.dry_run = out, force, dry_run
        self.path = out / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.is_file() and not force else {}

    def run(self, name: str, group: str, args: list, fresh: Path = None):
        """Run `dpokit ARGS` unless recorded as done; `fresh`: a run directory to empty first under --force."""
        cmd = [sys.executable, "-m", "dpokit.cli", *args]
        shown = "dpokit " + " ".join(shlex.quote(a) for a in args)
        if name in self.done and not self.force:
            print(f"[{name}] done before in {self.done[name]['seconds']:.0f} s; skipped", flush=True)
            return
        print(f"\n[{name}] {shown}", flush=True)
        if self.dry_run:
            return
        if self.force and fresh is not None and fresh.is_dir():
            shutil.rmtree(fresh)  # old checkpoints (and their evals) would otherwise mix with the new run's
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        seconds = time.perf_counter() - t0
        if rc != 0:
            sys.exit(f"[{name}] failed (exit code {rc}) after {seconds:.0f} s: {shown}")
        print(f"[{name}] {seconds:.1f} s", flush=True)
        self.done[name] = {"group": group, "seconds": round(seconds, 1), "command": shown}
        self.out.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.done, indent=1))

    def summary(self) -> str:
        groups = {}
        for v in self.done.values():
            n, s = groups.get(v["group"], (0, 0.0))
            groups[v["group"]] = (n + 1, s + v["seconds"])
        lines = ["| stage | commands | wall time |", "| --- | ---: | ---: |"]
        lines += [f"| {g} | {n} | {s / 60:.1f} min |" for g, (n, s) in groups.items()]
        total = sum(s for _, s in groups.values())
        lines.append(f"| total | {sum(n for n, _ in groups.values())} | {total / 60:.1f} min |")
        return "\n".join(lines)


def checkpoints(run_dir: Path) -> list:
    found = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def prune(run_dir: Path):
    """Drop the optimizer state (and PPO's rollouts) of every checkpoint but the newest: evaluation needs only
    the weights, and at 2x the weights' size the optimizer states would fill the disk (20 checkpoints of the
    135M model: ~20 GB). The newest stays complete, so the run can still be resumed or extended."""
    freed = 0
    for ckpt in checkpoints(run_dir)[:-1]:
        for name in ("optimizer.pt", "rollouts.pt"):
            f = ckpt / name
            if f.is_file():
                freed += f.stat().st_size
                f.unlink()
    if freed:
        print(f"[{run_dir.name}] removed the optimizer states of older checkpoints ({freed / 2**30:.1f} GiB)")


def main(argv=None):
    args = parse_args(argv)
    scale = SCALES[args.scale]
    out = Path(args.out)
    betas = args.betas or scale["betas"]
    kl_coefs = args.kl_coefs or scale["kl_coefs"]
    stages = Stages(out, args.force, args.dry_run)
    print(
        f"scale={args.scale} out={out} model={args.model} seed={args.seed} betas={betas} kl_coefs={kl_coefs} "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        flush=True,
    )
    t_start = time.perf_counter()

    runs = []  # (run directory, eval overrides)
    # a killed run continues from its newest checkpoint; --force starts every run afresh
    common = [f"model={args.model}", f"seed={args.seed}"] + ([] if args.force else ["resume=auto"])
    if "dpo" not in args.skip:
        for beta in betas:
            run_dir = out / f"dpo-beta{beta:g}"
            stages.run(
                f"dpo beta={beta:g}",
                "DPO training",
                [
                    "dpo",
                    "--config",
                    str(CONFIGS / "dpo.yaml"),
                    *common,
                    f"beta={beta:g}",
                    f"output_dir={run_dir}",
                    *scale["dpo"],
                ],
                fresh=run_dir,
            )
            prune(run_dir)
            runs.append((run_dir, [f"beta={beta:g}"]))  # eval's implicit reward uses the run's beta
    if "ppo" not in args.skip:
        for kl in kl_coefs:
            run_dir = out / f"ppo-kl{kl:g}"
            stages.run(
                f"ppo kl_coef={kl:g}",
                "PPO training",
                [
                    "rl",
                    "--config",
                    str(CONFIGS / "ppo.yaml"),
                    *common,
                    f"kl_coef={kl:g}",
                    f"output_dir={run_dir}",
                    *scale["ppo"],
                ],
                fresh=run_dir,
            )
            prune(run_dir)
            runs.append((run_dir, []))

    for run_dir, extra in runs:
        found = checkpoints(run_dir)
        if not found and not args.dry_run:
            sys.exit(f"{run_dir}: no checkpoints to evaluate")
        for ckpt in found or [run_dir / "checkpoint-N"]:
            stages.run(
                f"eval {run_dir.name}/{ckpt.name}",
                "evaluation",
                [
                    "eval",
                    "--config",
                    str(CONFIGS / "eval.yaml"),
                    f"model={ckpt}",
                    f"ref_model={args.model}",
                    f"output_file={ckpt / 'eval.json'}",
                    *extra,
                    *scale["eval"],
                ],
            )

    model = "SmolLM2-135M-Instruct" if args.model == "default" else Path(args.model).name
    title = f"controlled sentiment ({model}, VADER reward, scale {args.scale}, seed {args.seed})"
    stages.force = True  # the frontier is cheap: always redraw it from every eval present
    stages.run(
        "frontier", "frontier", ["frontier", f"inputs={out}", f"output_dir={out / 'frontier'}", f"title={title}"]
    )
    if args.dry_run:
        return
    summary = stages.summary()
    (out / "timings.md").write_text(summary + "\n")
    print(f"\nwall time by stage (this invocation took {(time.perf_counter() - t_start) / 60:.1f} min):\n{summary}")
    print(f"\nthe frontier: {out / 'frontier' / 'frontier.png'}, table {out / 'frontier' / 'frontier.md'}")


if __name__ == "__main__":
    main()
