"""Ground-truth reward functions r(x, y) for sampled responses, by name or `module:function`.

A reward function takes lists of prompts and responses (plain strings) and returns one float each.
Built in: `vader`, the VADER compound sentiment score in [-1, 1] of the response (Hutto & Gilbert,
2014), the deterministic stand-in for the sentiment classifier of the DPO paper's controlled
sentiment-generation task.
"""

import importlib
from typing import Callable, Sequence

from dpokit.errors import UserError

RewardFn = Callable[[Sequence[str], Sequence[str]], list]

_vader = None


def vader(prompts: Sequence[str], responses: Sequence[str]) -> list:
    global _vader
    if _vader is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _vader = SentimentIntensityAnalyzer()
    return [float(_vader.polarity_scores(r)["compound"]) for r in responses]


BUILTIN = {"vader": vader}


def get_reward_fn(name: str) -> RewardFn:
    if name.startswith("rm:"):  # a reward model trained by `dpokit rm` (dpokit/reward_model.py)
        return importlib.import_module("dpokit.reward_model").RewardModelFn(name[3:])
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise UserError(f"reward '{name}': not one of {', '.join(BUILTIN)} and not 'module:function'")
    mod, fn = name.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise UserError(f"reward '{name}': cannot import ({e})") from None
