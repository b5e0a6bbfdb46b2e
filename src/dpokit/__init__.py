"""dpokit: Direct Preference Optimization for Hugging Face causal language models.

Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
(arXiv 2305.18290).

The Python API is the command line's: one function per command, named like it, taking the command's
config (an object, a dict of its keys, or a YAML path) with the same keys, defaults and checks:

    import dpokit
    result = dpokit.dpo({"model": "default", "dataset": "pairs.jsonl", "beta": 0.1})
    result.model, result.metrics, result.output_dir

    dpokit.dpo, dpokit.sft, dpokit.rm, dpokit.rl          train (TrainResult; model= / train_dataset= ...)
    dpokit.evaluate, dpokit.generate, dpokit.pairs         evaluate, sample, label
    dpokit.verify, dpokit.frontier                         check the losses; plot eval results

Building blocks for your own loop: dpokit.losses (pure functions of log-probs and the LOSSES
registry), dpokit.logprobs.sequence_logps, dpokit.data.tokenize.tokenize_pair, and the collators of
dpokit.data.layouts; see docs/api.md. Everything is imported on first use (`import dpokit` is light).
"""

import importlib

from dpokit.errors import UserError

__version__ = "0.1.0"

# public name -> module that defines it (loaded on first access)
_LAZY = {
    "dpo": "dpokit.commands.dpo",
    "DPOConfig": "dpokit.commands.dpo",
    "sft": "dpokit.commands.sft",
    "SFTConfig": "dpokit.commands.sft",
    "rm": "dpokit.commands.rm",
    "RMConfig": "dpokit.commands.rm",
    "rl": "dpokit.commands.rl",
    "RLConfig": "dpokit.commands.rl",
    "evaluate": "dpokit.commands.evaluate",
    "EvalConfig": "dpokit.commands.evaluate",
    "generate": "dpokit.commands.generate",
    "GenerateConfig": "dpokit.commands.generate",
    "pairs": "dpokit.commands.pairs",
    "PairsConfig": "dpokit.commands.pairs",
    "verify": "dpokit.commands.verify",
    "VerifyConfig": "dpokit.commands.verify",
    "frontier": "dpokit.commands.frontier",
    "FrontierConfig": "dpokit.commands.frontier",
    "Callback": "dpokit.train.callbacks",
    "TrainState": "dpokit.train.callbacks",
    "TrainResult": "dpokit.train.loop",
    "sequence_logps": "dpokit.logprobs",
    "tokenize_pair": "dpokit.data.tokenize",
    "LOSSES": "dpokit.losses",
}

__all__ = ["UserError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'dpokit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
