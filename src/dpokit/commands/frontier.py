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

From the config: `algorithm` (ppo / rloo; rloo-rm / ppo-rm on a learned `rm:` reward) with its
`kl_coef` (with adaptive_kl, its `target_kl`), or a DPO-family `loss_type` (`dpo` for the
sigmoid loss, otherwise the loss names) with its `beta`. Points of one run (one output directory) are
joined in step order and labelled with the setting; every method gets one colour. The reference's own
samples, which every eval JSON also carries, give the reference point (KL 0) once per reference model.

Writes `frontier.png`, `frontier.md` (the table: per point KL, reward, the paired reward difference
against pi_ref, win rate, fraction finished; then the verdict) and `frontier.json` (the points) into
output_dir.
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
    verdict_kls: typing.List[float] = opt(
        [0.5, 1.0, 2.0, 3.0, 4.0],
        "KLs (nats) at which the methods' frontiers are compared (flagged 'interpolated' where a method has no "
        "checkpoint within a factor 2)",
    )
    bootstrap_samples: int = opt(
        1000, "bootstrap replicates (prompts resampled jointly across every checkpoint, run and method)"
    )
    confidence: float = opt(0.95, "level of the bootstrap intervals")
    seed: int = opt(0, "seed of the bootstrap")

    def check(self):
        if self.bootstrap_samples < 10:
            raise UserError(f"key 'bootstrap_samples': at least 10, got {self.bootstrap_samples}")
        if not 0.5 <= self.confidence < 1:
            raise UserError(f"key 'confidence': must be in [0.5, 1), got {self.confidence}")
        if any(not k > 0 for k in self.verdict_kls):
            raise UserError("key 'verdict_kls': every KL must be positive")


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
    per_prompt: typing.Optional[dict] = None  # {"reward": [...], "kl": [...]}: the eval's per-prompt numbers
    prompts: typing.Optional[str] = None  # the eval's prompts_fingerprint: points are paired only on the same prompts
    reward_diff: typing.Optional[float] = None  # the paired reward difference against pi_ref on the same prompts
    reward_diff_se: typing.Optional[float] = None
    finished: typing.Optional[float] = None  # the fraction of sampled responses that ended with EOS
    seed: typing.Optional[int] = None  # the training run's seed (runs of several seeds: the verdict by seed)


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
        setting = f"kl_coef={_num(cfg['kl_coef'])}"
        if cfg.get("adaptive_kl"):  # the coefficient moves: the run is known by the KL it steers towards
            setting = f"target_kl={_num(cfg.get('target_kl'))} (adaptive, {setting} at start)"
        # on a learned reward model (`rm:PATH`) it is another method than on the true reward
        learned = str(cfg.get("reward", "")).startswith("rm:")
        return str(cfg["algorithm"]) + ("-rm" if learned else ""), setting
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
        if ref_key not in references:
            references[ref_key] = reference_point(ref, path)
            references[ref_key].per_prompt = per_prompt_of(ref, path, ("reward",), data.get("prompts_fingerprint"))
            references[ref_key].prompts = data.get("prompts_fingerprint")
            references[ref_key].rewards_per_prompt = ref.get("rewards_per_prompt")
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
                per_prompt=per_prompt_of(pol, path, ("reward", "kl"), data.get("prompts_fingerprint")),
                prompts=data.get("prompts_fingerprint"),
                reward_diff=_opt(pol.get("reward_diff")),
                reward_diff_se=_opt(pol.get("reward_diff_se")),
                finished=_opt(pol.get("finished")),
                seed=cfg.get("seed") if isinstance(cfg.get("seed"), int) else None,
            )
        )
    return dedupe(points), list(references.values()), rewards


def per_prompt_of(side: dict, path, keys, prompts) -> typing.Optional[dict]:
    """An eval side's per-prompt numbers, checked (None when the eval predates them)."""
    got = side.get("per_prompt")
    if got is None or prompts is None:
        return None
    if not isinstance(got, dict) or any(
        not isinstance(got.get(k), list) or not all(_is_number(v) for v in got[k]) for k in keys
    ):
        raise UserError(f"{path}: field 'per_prompt': expected lists of numbers for {', '.join(keys)}")
    if len({len(got[k]) for k in keys}) != 1:
        raise UserError(f"{path}: field 'per_prompt': lists of different lengths")
    return {k: got[k] for k in keys}


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
        finished=_opt(ref.get("finished")),
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


# --- frontier estimates, intervals, verdict ------------------------------------------------------------------


def analyse(points, references, cfg) -> typing.Optional[dict]:
    """Each method's frontier (isotonic fit through pi_ref and its checkpoints) with bootstrap intervals
    that resample prompts jointly across all checkpoints, runs and methods; the pairwise verdict at each
    of cfg.verdict_kls; the oracle and best-of-n curves from the reference's extra samples. None when
    the evals carry no per-prompt numbers (older `dpokit eval`)."""
    import numpy as np

    from dpokit.estimators import best_of_n, compare_at, frontier_curves, oracle_tilt

    ref = next((r for r in references if r.per_prompt is not None), None)
    usable = [p for p in points if ref is not None and p.per_prompt is not None and p.prompts == ref.prompts]
    if not usable:
        log.warning("no per-prompt numbers on shared prompts in these evals: no frontier estimates or verdict")
        return None
    skipped = len(points) - len(usable)
    if skipped:
        log.warning("%d point(s) without per-prompt numbers on the reference's prompts: left out of the fits", skipped)
    ref_rewards = ref.per_prompt["reward"]
    P = len(ref_rewards)
    methods = sorted({p.method for p in usable}, key=lambda m: (m != "dpo", m))
    top = max(p.kl for p in usable)
    grid = sorted(set(np.round(np.linspace(0.0, top, 41), 4).tolist()) | set(cfg.verdict_kls))
    indices = np.random.default_rng(cfg.seed).integers(0, P, (cfg.bootstrap_samples, P))  # (B, P)
    lo_q, hi_q = (1 - cfg.confidence) / 2 * 100, (1 + cfg.confidence) / 2 * 100
    curves, boots = {}, {}
    for m in methods:
        pts = [p for p in usable if p.method == m]
        R = [p.per_prompt["reward"] for p in pts]
        K = [p.per_prompt["kl"] for p in pts]
        if any(len(r) != P for r in R):
            raise UserError(f"{pts[0].file}: per-prompt numbers for {len(R[0])} prompts, the reference's for {P}")
        point = frontier_curves(R, K, ref_rewards, grid)
        boot = boots[m] = frontier_curves(R, K, ref_rewards, grid, indices)  # (B, len(grid))
        reached = ~np.isnan(boot)
        low = [
            float(np.percentile(boot[reached[:, j], j], lo_q)) if reached[:, j].any() else None
            for j in range(len(grid))
        ]
        high = [
            float(np.percentile(boot[reached[:, j], j], hi_q)) if reached[:, j].any() else None
            for j in range(len(grid))
        ]
        curves[m] = {
            "kl": grid,
            "reward": [None if np.isnan(v) else float(v) for v in point],
            "low": low,
            "high": high,
            "points": len(pts),
            "points_between_0.5_and_4": sum(1 for p in pts if 0.5 <= p.kl <= 4),
        }
    per_seed = seed_frontiers(usable, methods, ref_rewards, cfg.verdict_kls, frontier_curves)
    verdict = []
    for x in cfg.verdict_kls:
        j = grid.index(x)
        for i, a in enumerate(methods):
            for b in methods[i + 1 :]:
                pa, pb = curves[a]["reward"][j], curves[b]["reward"][j]
                nan = float("nan")
                c = compare_at(
                    boots[a][:, j], boots[b][:, j], nan if pa is None else pa, nan if pb is None else pb, cfg.confidence
                )
                support = {m: bracket([p.kl for p in usable if p.method == m], x) for m in (a, b)}
                text = verdict_text(a, b, pa, pb, c) + support_text(support, pa, pb)
                by_seed = seed_differences(per_seed, a, b, cfg.verdict_kls.index(x))
                verdict.append({"kl": x, "a": a, "b": b, **c, "support": support, "by_seed": by_seed, "text": text})
    out = {"frontiers": curves, "verdict": verdict, "prompts": P, "bootstrap_samples": cfg.bootstrap_samples}
    many = getattr(ref, "rewards_per_prompt", None)
    if many:
        k = len(many[0])
        tilt = sorted(oracle_tilt(many, beta)[::-1] for beta in np.geomspace(0.02, 20, 50))
        out["oracle"] = {
            "samples_per_prompt": k,
            "kl": [t[0] for t in tilt],
            "reward": [t[1] for t in tilt],
            "reliable_below_kl": math.log(k) - 1,
        }
        ns = sorted({n for n in (2**i for i in range(20)) if n <= k} | {k})
        bon = [best_of_n(many, n) for n in ns]
        out["best_of_n"] = {"n": ns, "reward": [b[0] for b in bon], "kl": [b[1] for b in bon]}
    return out


def seed_frontiers(points, methods, ref_rewards, kls, frontier_curves) -> dict:
    """method -> seed -> its frontier read at kls, fitted on that seed's runs alone (methods with runs of
    one seed, or none recorded, are left out). The bootstrap intervals cover the prompts only; these show
    how much the training runs themselves move the answer."""
    out = {}
    for m in methods:
        seeds = sorted({p.seed for p in points if p.method == m and p.seed is not None})
        if len(seeds) < 2:
            continue
        out[m] = {}
        for seed in seeds:
            pts = [p for p in points if p.method == m and p.seed == seed]
            R, K = [p.per_prompt["reward"] for p in pts], [p.per_prompt["kl"] for p in pts]
            out[m][seed] = frontier_curves(R, K, ref_rewards, kls)
    return out


def seed_differences(per_seed: dict, a, b, j: int) -> dict:
    """Each seed both methods ran with (when there are two or more): its own frontier difference a - b at
    the j-th verdict KL, keyed by seed (None where one of them does not reach it)."""
    shared = sorted(set(per_seed.get(a, {})) & set(per_seed.get(b, {})))
    if len(shared) < 2:
        return {}
    out = {}
    for seed in shared:
        va, vb = float(per_seed[a][seed][j]), float(per_seed[b][seed][j])
        out[str(seed)] = None if math.isnan(va) or math.isnan(vb) else va - vb
    return out


def bracket(kls: list, x: float) -> dict:
    """A method's checkpoints around KL x: the nearest at or below (pi_ref's 0 if none) and at or above
    (None if none), and whether one lies within a factor 2 of x. Without one, the frontier there is a
    straight line across a gap: a reading of the fit, not of a measured policy."""
    below = max([k for k in kls if k <= x], default=0.0)
    above = min([k for k in kls if k >= x], default=None)
    return {"below": below, "above": above, "near": any(x / 2 <= k <= 2 * x for k in kls)}


def support_text(support: dict, pa, pb) -> str:
    """The verdict's caveat where a method has no checkpoint near the KL (within a factor 2)."""
    if pa is None or pb is None:
        return ""
    gaps = [
        f"{m} has no checkpoint within a factor 2 of it (nearest at {s['below']:.2f} and {s['above']:.2f} nats)"
        for m, s in support.items()
        if not s["near"] and s["above"] is not None
    ]
    return f"; interpolated: {'; '.join(gaps)}" if gaps else ""


def verdict_text(a, b, pa, pb, c) -> str:
    if pa is None or pb is None or c["unreached"] > 0.05:
        missing = [m for m, v in ((a, pa), (b, pb)) if v is None] or ["one of them in some bootstrap replicates"]
        return f"not reached by {' and '.join(missing)}"
    if c["low"] > 0:
        return f"{a} higher by {c['difference']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"
    if c["high"] < 0:
        return f"{b} higher by {-c['difference']:.3f} [{-c['high']:.3f}, {-c['low']:.3f}]"
    return f"no difference larger than {max(abs(c['low']), abs(c['high'])):.3f} ({a} - {b} = {c['difference']:+.3f})"


def verdict_table(analysis, confidence) -> str:
    seeds = any(v.get("by_seed") for v in analysis["verdict"])
    lines = [
        f"| KL (nats) | A | B | frontier A - B [{confidence:.0%} interval] |"
        + (" A - B by seed |" if seeds else "")
        + " verdict |",
        "| ---: | --- | --- | ---: |" + (" ---: |" if seeds else "") + " --- |",
    ]
    for v in analysis["verdict"]:
        d = "" if math.isnan(v["difference"]) else f"{v['difference']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"
        by = "; ".join(
            f"seed {k}: " + ("not reached" if x is None else f"{x:+.3f}") for k, x in v.get("by_seed", {}).items()
        )
        lines.append(f"| {v['kl']:g} | {v['a']} | {v['b']} | {d} |" + (f" {by} |" if seeds else "") + f" {v['text']} |")
    return "\n".join(lines)


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


def plot(points, references, out_png, title, reward_name, analysis=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(p.method for p in sorted(points, key=lambda p: p.method)))
    colour = colours_for(["reference"] + methods)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    several_seeds = len({p.seed for p in points}) > 1
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
        ax.annotate(  # the setting's short form ("target_kl=2.7"; the table has the rest), and the seed if several
            last.setting.split(" (")[0] + (f", seed {last.seed}" if several_seeds else ""),
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
    if analysis:
        for m, c in analysis["frontiers"].items():
            xs = [x for x, v in zip(c["kl"], c["reward"]) if v is not None]
            ax.plot(xs, [v for v in c["reward"] if v is not None], color=colour[m], lw=2.4, alpha=0.55)
            band = [(x, lo, hi) for x, lo, hi in zip(c["kl"], c["low"], c["high"]) if lo is not None]
            if band:
                bx, blo, bhi = zip(*band)
                ax.fill_between(bx, blo, bhi, color=colour[m], alpha=0.12, lw=0)
        if "oracle" in analysis:
            o = analysis["oracle"]
            ax.plot(o["kl"], o["reward"], color="black", ls="--", lw=1.2)
            handles.append(plt.Line2D([], [], color="black", ls="--", label="oracle pi_ref exp(r/beta)/Z"))
        if "best_of_n" in analysis:
            b = analysis["best_of_n"]
            ax.plot(b["kl"], b["reward"], color="gray", ls=":", marker="x", ms=5, lw=1.2)
            handles.append(plt.Line2D([], [], color="gray", ls=":", marker="x", label="best of n (pi_ref)"))
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
        "thin lines: one run's checkpoints, labelled at the last; bars: ±1 s.e.; thick lines and bands: "
        "each method's frontier and its bootstrap interval",
        fontsize=7,
        color="gray",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def _public(p) -> dict:
    """A point as frontier.json lists it (without its per-prompt numbers, which stay in the eval files)."""
    d = asdict(p)
    d.pop("per_prompt", None)
    return d


def _pm(v, se, f="{:+.3f}") -> str:
    return "" if v is None else f.format(v) + ("" if se is None else f" ± {se:.3f}")


def table(points, references) -> str:
    lines = [
        "| method | setting | step | KL(pi‖pi_ref) | reward | paired diff vs pi_ref | win rate vs pi_ref "
        "| finished | implicit-reward acc | front |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in references:
        lines.append(
            f"| reference | {r.setting} | 0 | {_pm(r.kl, r.kl_se, '{:.2f}')} | {_pm(r.reward, r.reward_se)} | | "
            f"| {_fraction(r.finished)} | | |"
        )
    for pts in by_run(points).values():
        for p in pts:
            acc = "" if p.implicit_reward_accuracy is None else f"{p.implicit_reward_accuracy:.3f}"
            lines.append(
                f"| {p.method} | {p.setting} | {p.step} | {_pm(p.kl, p.kl_se, '{:.2f}')} "
                f"| {_pm(p.reward, p.reward_se)} | {_pm(p.reward_diff, p.reward_diff_se)} "
                f"| {_pm(p.win_rate, p.win_rate_se, '{:.3f}')} | {_fraction(p.finished)} | {acc} "
                f"| {'*' if p.on_front else ''} |"
            )
    return "\n".join(lines)


def _fraction(v) -> str:
    return "" if v is None else f"{v:.2f}"


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
    analysis = analyse(points, references, cfg)
    plot(points, references, out / "frontier.png", cfg.title, reward_names[0], analysis)
    md = table(points, references)
    notes = (
        "`front`: on its method's reward/KL Pareto front (no point of the same method has lower KL and "
        "higher reward).\n"
    )
    if analysis:
        md += (
            f"\n\nEach method's frontier: the isotonic (non-decreasing) fit of reward on KL through pi_ref and "
            f"its checkpoints, read at each KL; intervals: {cfg.confidence:.0%} bootstrap percentiles over "
            f"{analysis['bootstrap_samples']} resamples of the {analysis['prompts']} prompts, the same "
            "resample for every checkpoint, run and method"
            + (
                " (they cover the prompts, not the training runs: `by seed` is each seed's own difference, the "
                "fit redone on that seed's runs alone)"
                if any(v.get("by_seed") for v in analysis["verdict"])
                else ""
            )
            + ".\n\n"
            + verdict_table(analysis, cfg.confidence)
        )
    atomic_write_text(out / "frontier.md", f"{md}\n\n{notes}")
    result = {
        "reward_fn": reward_names[0],
        "references": [_public(r) for r in references],
        "points": [_public(p) for pts in by_run(points).values() for p in pts],
        **(analysis or {}),
    }
    atomic_write_text(out / "frontier.json", json.dumps(result, indent=2))
    print(md)
    print(
        f"{len(points)} points from {len(files)} eval results; wrote {out / 'frontier.png'}, "
        f"{out / 'frontier.md'}, {out / 'frontier.json'}"
    )
    return result
