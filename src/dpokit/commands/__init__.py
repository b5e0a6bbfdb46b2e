"""One module per command: its config class and a function named like the command. The command line
(cli.py) and the Python API (dpokit/__init__.py) both read this table, so they cannot drift apart.
Modules are imported only when used: `dpokit --help` and config errors answer without torch."""

# command -> (module, config class, function, description)
COMMANDS = {
    "dpo": (
        "dpokit.commands.dpo",
        "DPOConfig",
        "dpo",
        "fine-tune a causal LM with DPO (or another preference loss) on preference pairs",
    ),
    "eval": (
        "dpokit.commands.evaluate",
        "EvalConfig",
        "evaluate",
        "a trained policy against its reference on held-out data",
    ),
    "verify": (
        "dpokit.commands.verify",
        "VerifyConfig",
        "verify",
        "the losses recover DPO's closed-form optimum on an enumerable toy",
    ),
    # the classic RLHF pipeline that DPO replaces (docs/pipeline.md)
    "sft": (
        "dpokit.commands.sft",
        "SFTConfig",
        "sft",
        "supervised fine-tuning on demonstrations (the pi_SFT / pi_ref of DPO and RLHF)",
    ),
    "rm": ("dpokit.commands.rm", "RMConfig", "rm", "train a Bradley-Terry reward model on preference pairs"),
    "generate": ("dpokit.commands.generate", "GenerateConfig", "generate", "sample responses to prompts (JSONL)"),
    "pairs": (
        "dpokit.commands.pairs",
        "PairsConfig",
        "pairs",
        "label sampled responses with a reward into preference pairs",
    ),
    "rl": (
        "dpokit.commands.rl",
        "RLConfig",
        "rl",
        "RLHF: PPO or RLOO against a reward model, with a KL penalty to the reference",
    ),
    "frontier": (
        "dpokit.commands.frontier",
        "FrontierConfig",
        "frontier",
        "reward-versus-KL scatter (PNG + table) of `dpokit eval` results, one colour per method",
    ),
}
