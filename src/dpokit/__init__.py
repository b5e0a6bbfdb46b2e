"""dpokit: Direct Preference Optimization for Hugging Face causal language models.

Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
(arXiv 2305.18290).
"""

__version__ = "0.1.0"

from dpokit.errors import UserError  # noqa: E402,F401
