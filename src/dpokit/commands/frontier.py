"""`dpokit frontier`: the reward-versus-KL frontier of the DPO paper (Rafailov et al., 2023, Fig. 2 left),
drawn from `dpokit eval` results.

Each eval JSON gives one point: the mean ground-truth reward of the policy's samples (y) against the
sequence KL(pi || pi_ref) estimated on those samples (x), each with its standard error. What made the
policy is read from the run itself, never from file names:

  eval JSON beside (or naming, in `policy.model`) a checkpoint `.../checkpoint-<step>/`
      -> its trainer_state.json: the step and the resolved config of the run;
  a run's final output directory
      -> its config.yaml, and the step of its newest checkpoint (or the last step in metrics.jsonl);
  a policy that is its own reference (`dpokit eval model=X ref_model=X`)
      -> the reference point, KL 0.

From the config: `algorithm` (ppo / rloo) with its `kl_coef`, or a DPO-family `loss_type` (`dpo` for the
sigmoid loss, otherwise the loss names) with its `beta`. Points of one run (one output directory) are
joined in step order and labelled with the setting; every method gets one colour. The reference's own
samples, which every eval JSON also carries, give the reference point (KL 0) once per reference model.

Writes `frontier.png`, `frontier.md` (the table) and `frontier.json` (the points) into output_dir.
"""

import glob
import json
import math
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from dpokit.config import opt, resolve_config
from dpokit.errors import UserError
from dpokit.io import atomic_write_text
from dpokit.report import log


@dataclass
class FrontierConfig:
    """Reward-versus-KL scatter (one colour per method) of `dpokit eval` results, with a table."""

    inputs: typing.Optional[typing.List[str]] = opt(
        None,
        "eval JSON files, glob patterns (quote them: `runs/*/checkpoint-*/eval.json`), "
        "or directories searched recursively for files matching `pattern`",
    )
    pattern: str = opt("eval*.json", "file-name pattern of eval results when searching a directory")
    output_dir: str = opt("runs/frontier", "where frontier.png, frontier.md and frontier.json are written")
    title: str = opt("reward vs KL frontier", "title of the plot")


@dataclass
class Point:
    method: str  # dpo, ppo, rloo, ipo, sft, reference, ...
    setting: str  # "beta=0.1", "kl_coef=0.05", "" for the reference
    step: int
    run: str  # the run's output directory (points of one run share it)
    kl: float
    kl_se: float
    reward: float
    reward_se: float
    win_rate: typing.Optional[float]
    win_rate_se: typing.Optional[float]
    implicit_reward_accuracy: typing.Optional[float]
    file: str
    on_front: bool = False  # on its method's Pareto front: no point of the method has lower KL and more reward


# --- finding and reading the eval results ---------------------------------------------------------------------


def find_files(inputs, pattern: str) -> list:
    """Files, glob patterns and directories (searched recursively) -> sorted unique paths."""
    if not inputs:
        raise UserError("key 'inputs' is required: eval JSON files, glob patterns or directories")
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob(pattern) if p.is_file())
            if not matches:
                raise UserError(f"{path}: no files matching '{pattern}' in this directory")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"{item}: no files match this pattern")
        else:
            raise UserError(f"{path}: no such file or directory")
        found += matches
    return sorted(set(found), key=str)


def read_eval(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a `dpokit eval` result (a JSON object)")
    for side in ("policy", "reference"):
        entry = data.get(side)
        if not isinstance(entry, dict):
            raise UserError(f"{path}: field '{side}' missing: not a `dpokit eval` result")
        for key in ("reward", "kl"):
            if key not in entry:
                raise UserError(
                    f"{path}: field '{side}.{key}' missing (run `dpokit eval` with a reward, e.g. reward=vader)"
                )
            if not _is_number(entry[key]):
                raise UserError(f"{path}: field '{side}.{key}': expected a number, got {entry[key]!r}")
        for key in ("reward_se", "kl_se"):
            if key in entry and not _is_number(entry[key]):
                raise UserError(f"{path}: field '{side}.{key}': expected a number, got {entry[key]!r}")
    return data


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- what made each policy --------------------------------------------------------------------------------------


def run_of(path: Path, data: dict) -> tuple[dict, int, Path] | None:
    """(resolved config, step, run directory) of the policy an eval JSON is about, or None if the policy is
    not a dpokit run. Looks beside the eval file first, then at `policy.model`."""
    candidates = [path.parent]
    model = data["policy"].get("model")
    if isinstance(model, str) and Path(model).is_dir():
        candidates.append(Path(model))
    for d in candidates:
        state_file = d / "trainer_state.json"
        if state_file.is_file():  # a checkpoint: its state holds the step and the resolved config
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
                return state["config"], int(state["step"]), d.parent
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{state_file}: not a dpokit checkpoint state ({type(e).__name__}: {e})") from None
        config_file = d / "config.yaml"
        if config_file.is_file():  # a run's final output directory
            try:
                cfg = yaml.safe_load(config_file.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as e:
                raise UserError(f"{config_file}: cannot read the run's config ({str(e).splitlines()[0]})") from None
            if not isinstance(cfg, dict):
                raise UserError(f"{config_file}: expected a mapping of key: value")
            return cfg, final_step(d), d
    return None


def final_step(run_dir: Path) -> int:
    """The step a run's final model was saved at: its newest checkpoint, else the last step it logged."""
    steps = [
        int(p.name[len("checkpoint-") :])
        for p in run_dir.glob("checkpoint-*")
        if p.name[len("checkpoint-") :].isdigit() and (p / "trainer_state.json").is_file()
    ]
    if steps:
        return max(steps)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                steps.append(int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError, TypeError):
                continue
    if not steps:
        raise UserError(f"{run_dir}: cannot tell the step of this run's model (no checkpoints, no metrics.jsonl)")
    return max(steps)


def method_of(cfg: dict, where) -> tuple[str, str]:
    """(method, setting) from a run's resolved config."""
    if "algorithm" in cfg and "kl_coef" in cfg:  # dpokit rl
        setting = f"kl_coef={_num(cfg['kl_coef'])}" + (" (adaptive)" if cfg.get("adaptive_kl") else "")
        return str(cfg["algorithm"]), setting
    if "loss_type" in cfg and "beta" in cfg:  # dpokit dpo and its loss family
        losses = cfg["loss_type"] if isinstance(cfg["loss_type"], list) else [cfg["loss_type"]]
        method = "dpo" if losses == ["sigmoid"] else "+".join(map(str, losses))
        return method, f"beta={_num(cfg['beta'])}"
    if "loss_normalization" in cfg:  # dpokit sft (the paper's preferred-FT baseline)
        return "sft", f"lr={_num(cfg.get('learning_rate'))}"
    raise UserError(f"{where}: the run's config is neither `dpokit dpo`, `rl` nor `sft` (no beta / kl_coef)")


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def collect(files) -> tuple[list, list, dict]:
    """-> (policy points, reference points, reward name -> a file that used it). A policy evaluated against
    itself is a reference point."""
    points, references, rewards = [], {}, {}
    for path in files:
        data = read_eval(path)
        rewards.setdefault(str(data.get("reward_fn", "reward")), path)
        pol, ref = data["policy"], data["reference"]
        ref_key = (str(ref.get("model")), ref["reward"], ref["kl"])
        references.setdefault(ref_key, reference_point(ref, path))
        found = run_of(path, data)
        if found is None:
            if pol.get("model") is not None and pol.get("model") == ref.get("model"):
                continue  # the reference evaluated against itself: its point comes from `reference`
            raise UserError(
                f"{path}: cannot tell which run made policy '{pol.get('model')}' (no "
                "trainer_state.json or config.yaml beside the file or in the model directory)"
            )
        cfg, step, run_dir = found
        method, setting = method_of(cfg, path)
        points.append(
            Point(
                method,
                setting,
                step,
                str(run_dir.resolve()),
                float(pol["kl"]),
                float(pol.get("kl_se", 0.0)),
                float(pol["reward"]),
                float(pol.get("reward_se", 0.0)),
                _opt(pol.get("win_rate")),
                _opt(pol.get("win_rate_se")),
                _opt(pol.get("implicit_reward_accuracy")),
                str(path),
            )
        )
    return dedupe(points), list(references.values()), rewards


def _opt(v):
    return float(v) if _is_number(v) else None


def reference_point(ref: dict, path) -> Point:
    return Point(
        "reference",
        str(ref.get("model", "")),
        0,
        "",
        float(ref["kl"]),
        float(ref.get("kl_se", 0.0)),
        float(ref["reward"]),
        float(ref.get("reward_se", 0.0)),
        None,
        None,
        _opt(ref.get("implicit_reward_accuracy")),
        str(path),
    )


def dedupe(points) -> list:
    """One point per (run, step): a run's final directory and its last checkpoint hold the same model."""
    seen, out = {}, []
    for p in points:
        key = (p.run, p.step)
        if key in seen:
            log.info("%s: step %d of %s already read from %s; skipped", p.file, p.step, p.run, seen[key])
            continue
        seen[key] = p.file
        out.append(p)
    return out


def mark_fronts(points):
    """A point is on its method's front when no other point of the method has KL <= and reward >, or KL <
    and reward >= (the upper-left envelope the paper compares)."""
    for p in points:
        p.on_front = not any(
            q is not p
            and q.method == p.method
            and ((q.kl <= p.kl and q.reward > p.reward) or (q.kl < p.kl and q.reward >= p.reward))
            for q in points
        )


# --- outputs ------------------------------------------------------------------------------------------------

COLOURS = {"reference": "black", "dpo": "tab:blue", "ppo": "tab:orange", "rloo": "tab:green", "sft": "tab:purple"}
OTHER_COLOURS = ["tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]


def colours_for(methods) -> dict:
    out, spare = {}, iter(OTHER_COLOURS * 10)
    for m in methods:
        out[m] = COLOURS.get(m) or next(spare)
    return out


def by_run(points) -> dict:
    """run directory -> its points in step order, runs ordered by method then setting value."""
    runs = {}
    for p in sorted(points, key=lambda p: (p.method, _setting_value(p.setting), p.run, p.step)):
        runs.setdefault(p.run, []).append(p)
    return runs


def _setting_value(setting: str):
    try:
        return (0, float(setting.split("=", 1)[1].split()[0]), setting)
    except (IndexError, ValueError):
        return (1, 0.0, setting)


def plot(points, references, out_png, title, reward_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(p.method for p in sorted(points, key=lambda p: p.method)))
    colour = colours_for(["reference"] + methods)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    marker_of = {}
    for run, pts in by_run(points).items():
        method = pts[0].method
        n = sum(1 for m in marker_of.values() if m[0] == method)
        marker_of[run] = (method, MARKERS[n % len(MARKERS)])
        ax.errorbar(
            [p.kl for p in pts],
            [p.reward for p in pts],
            xerr=[p.kl_se for p in pts],
            yerr=[p.reward_se for p in pts],
            color=colour[method],
            marker=marker_of[run][1],
            ms=5,
            lw=1.2,
            elinewidth=0.7,
            capsize=2,
            alpha=0.9,
        )
        last = pts[-1]
        ax.annotate(
            last.setting,
            (last.kl, last.reward),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
            color=colour[method],
        )
    for r in references:
        ax.errorbar(
            [r.kl],
            [r.reward],
            xerr=[r.kl_se],
            yerr=[r.reward_se],
            color=colour["reference"],
            marker="*",
            ms=11,
            capsize=2,
            ls="none",
        )
    handles = [plt.Line2D([], [], color=colour[m], marker="o", lw=1.2, label=m) for m in methods]
    if references:
        handles.insert(0, plt.Line2D([], [], color="black", marker="*", ms=10, ls="none", label="reference (pi_ref)"))
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_xlabel("KL(pi || pi_ref) per sequence, nats (estimated on the policy's samples)")
    ax.set_ylabel(f"mean reward of samples ({reward_name})")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.text(
        0.01,
        0.01,
        "lines: checkpoints of one run in step order, labelled at the last; bars: ±1 s.e.",
        fontsize=7,
        color="gray",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def _pm(v, se, f="{:+.3f}") -> str:
    return "" if v is None else f.format(v) + ("" if se is None else f" ± {se:.3f}")


def table(points, references) -> str:
    lines = [
        "| method | setting | step | KL(pi‖pi_ref) | reward | win rate vs pi_ref | implicit-reward acc | front |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in references:
        lines.append(
            f"| reference | {r.setting} | 0 | {_pm(r.kl, r.kl_se, '{:.2f}')} | {_pm(r.reward, r.reward_se)} | | | |"
        )
    for pts in by_run(points).values():
        for p in pts:
            acc = "" if p.implicit_reward_accuracy is None else f"{p.implicit_reward_accuracy:.3f}"
            lines.append(
                f"| {p.method} | {p.setting} | {p.step} | {_pm(p.kl, p.kl_se, '{:.2f}')} "
                f"| {_pm(p.reward, p.reward_se)} | {_pm(p.win_rate, p.win_rate_se, '{:.3f}')} | {acc} "
                f"| {'*' if p.on_front else ''} |"
            )
    return "\n".join(lines)


def frontier(config=None) -> dict:
    """Reward-vs-KL scatter, table and JSON of `dpokit eval` results (config: a FrontierConfig, a dict
    of its keys or a YAML path); returns the points."""
    cfg = resolve_config(FrontierConfig, config)
    files = find_files(cfg.inputs, cfg.pattern)
    points, references, rewards = collect(files)
    if not points:
        raise UserError(
            f"{', '.join(cfg.inputs)}: no trained policies among {len(files)} eval result(s) "
            "(only the reference evaluated against itself)"
        )
    if len(rewards) > 1:
        (a, fa), (b, fb) = list(rewards.items())[:2]
        raise UserError(f"{fb}: scored with reward '{b}' but {fa} with '{a}': their points cannot share one plot")
    reward_names = list(rewards)
    if len({r.setting for r in references}) < len(references):
        log.warning(
            "warning: the evals sampled the same reference differently (different seeds, sample counts "
            "or settings?): their points may not be comparable"
        )
    mark_fronts(points)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    plot(points, references, out / "frontier.png", cfg.title, reward_names[0])
    md = table(points, references)
    atomic_write_text(
        out / "frontier.md",
        f"{md}\n\n`front`: on its method's reward/KL Pareto front (no point of "
        "the same method has lower KL and higher reward).\n",
    )
    result = {
        "reward_fn": reward_names[0],
        "references": [asdict(r) for r in references],
        "points": [asdict(p) for pts in by_run(points).values() for p in pts],
    }
    atomic_write_text(out / "frontier.json", json.dumps(result, indent=2))
    print(md)
    print(
        f"{len(points)} points from {len(files)} eval results; wrote {out / 'frontier.png'}, "
        f"{out / 'frontier.md'}, {out / 'frontier.json'}"
    )
    return result
