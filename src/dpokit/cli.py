"""`dpokit <command> [--config FILE.yaml] [key=value ...]`.

A UserError (bad data, bad config) becomes one line `error: ...` and exit code 2, with no traceback.
"""

import sys

import importlib

from dpokit.config import help_text, load_config
from dpokit.errors import Interrupted, UserError
from dpokit.report import setup_logging

# command -> (config class, module with run(cfg), description); imported only when used, so that
# `dpokit --help` and config errors answer without importing torch
COMMANDS = {
    "dpo": ("dpokit.config:DPOConfig", "dpokit.train.dpo", "fine-tune a causal LM with DPO (or another "
            "preference loss) on preference pairs"),
    "eval": ("dpokit.config:EvalConfig", "dpokit.evaluate", "a trained policy against its reference on held-out data"),
    "verify": ("dpokit.verify:VerifyConfig", "dpokit.verify", "the losses recover DPO's closed-form optimum on an "
               "enumerable toy"),
    # the classic RLHF pipeline that DPO replaces (docs/pipeline.md)
    "sft": ("dpokit.train.sft:SFTConfig", "dpokit.train.sft", "supervised fine-tuning on demonstrations (the "
            "pi_SFT / pi_ref of DPO and RLHF)"),
    "rm": ("dpokit.train.reward:RewardConfig", "dpokit.train.reward", "train a Bradley-Terry reward model on "
           "preference pairs"),
    "generate": ("dpokit.generate:GenerateConfig", "dpokit.generate", "sample responses to prompts (JSONL)"),
    "pairs": ("dpokit.pairs:PairsConfig", "dpokit.pairs", "label sampled responses with a reward into "
              "preference pairs"),
    "rl": ("dpokit.train.rl:RLConfig", "dpokit.train.rl", "RLHF: PPO or RLOO against a reward model, with a "
           "KL penalty to the reference"),
    "frontier": ("dpokit.frontier:FrontierConfig", "dpokit.frontier", "reward-versus-KL scatter (PNG + table) "
                 "of `dpokit eval` results, one colour per method"),
}


def config_class(name: str):
    module, cls = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


def usage() -> str:
    lines = ["usage: dpokit <command> [--config FILE.yaml] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<8} {doc}" for name, (_, _, doc) in COMMANDS.items()]
    lines += ["", "`dpokit <command> --help` lists every key."]
    return "\n".join(lines)


def parse(argv):
    config_file, overrides = None, []
    it = iter(argv)
    for a in it:
        if a in ("--config", "-c"):
            config_file = next(it, None)
            if config_file is None:
                raise UserError("--config needs a file")
        elif a.startswith("--config="):
            config_file = a.split("=", 1)[1]
        elif a.startswith("-"):
            raise UserError(f"unknown option '{a}' (keys are given as key=value)")
        else:
            overrides.append(a)
    return config_file, overrides


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}' (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    cls, module = config_class(command), COMMANDS[command][1]
    if "-h" in rest or "--help" in rest:
        print(help_text(cls, command))
        return 0
    setup_logging()
    try:
        cfg = load_config(cls, *parse(rest))
        importlib.import_module(module).run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"dpokit: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
