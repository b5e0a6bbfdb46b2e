"""A learned reward model r_phi(x, y): a causal LM with a scalar head (transformers'
`AutoModelForSequenceClassification` with num_labels=1), trained by `dpokit rm` (commands/rm.py, train/rm_step.py) with
the Bradley-Terry loss, and used as a reward function by `dpokit pairs`, `dpokit rl` and `dpokit eval`
under the name `rm:PATH`.

Where the reward is read: transformers' own pooling, the last token that is not `pad_token_id`
(`GenericForSequenceClassification.forward`). We use the model's output as it is, so a saved reward
model gives the same rewards to anyone who loads it with `AutoModelForSequenceClassification`. With
right padding that is the last token of the response; when the tokenizer pads with its EOS token (the
embedded SmolLM2 does), the response's closing EOS counts as padding too and the reward is read at the
token before it, which sees the whole response all the same.
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from dpokit.data.batch import pad_right
from dpokit.data.prompts import response_message
from dpokit.data.tokenize import tokenize_pair, truncate
from dpokit.errors import UserError


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r(x, y_w) - r(x, y_l)), (B,): the negative log-likelihood of the preference under
    the Bradley-Terry model p(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l)) (DPO paper, Eq. 2)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) right-padded sequences -> rewards (N,) in fp32, read where transformers reads them."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits[:, 0].float()


def load_reward_model(name: str, pad_token_id: int, trust_remote_code: bool = False):
    """A model directory (a causal LM to start from, or a trained reward model) -> a sequence classifier
    with one output; `pad_token_id` set, since transformers reads the reward from it."""
    from transformers import AutoModelForSequenceClassification

    from dpokit.models import resolve

    src = resolve(name)  # (its own errors name the model already)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            src, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: cannot load as a reward model ({str(e).splitlines()[0]})") from None
    model.config.pad_token_id = pad_token_id
    return model


class RewardModelFn:
    """A saved reward model as a reward function: fn(prompts, responses) -> [float].

    Prompts are strings or lists of messages (as in the data files), responses are the generated texts;
    each (prompt, response) is tokenized as in training (tokenize_pair: the chat template for messages,
    one EOS closing the response) and cut like the reward model's training data when its `config.yaml`
    is there (max_length, max_prompt_length, truncation_mode)."""

    def __init__(self, path: str, batch_size: int = 16, device=None):
        from dpokit.models import load_tokenizer

        if not Path(path).expanduser().is_dir():
            raise UserError(f"rm:{path}: no such reward model directory")
        self.path = path
        self.tokenizer = load_tokenizer(path)
        self.model = load_reward_model(path, self.tokenizer.pad_token_id).eval()
        self.device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.model.to(self.device)
        self.batch_size = batch_size
        self.max_length, self.max_prompt_length, self.truncation_mode = 1024, 512, "keep_end"
        cfg_file = Path(path) / "config.yaml"
        if cfg_file.is_file():
            import yaml

            trained = yaml.safe_load(cfg_file.read_text()) or {}
            self.max_length = trained.get("max_length", self.max_length)
            self.max_prompt_length = trained.get("max_prompt_length", self.max_prompt_length)
            self.truncation_mode = trained.get("truncation_mode", self.truncation_mode)

    def tokenize(self, prompt, response: str) -> list:
        y = response_message(prompt, response)
        pair = tokenize_pair(self.tokenizer, {"prompt": prompt, "chosen": y, "rejected": y})
        cut = truncate(pair, self.max_length, self.max_prompt_length, self.truncation_mode)
        pair = cut or pair
        return pair.prompt_ids + pair.chosen_ids

    @torch.no_grad()
    def __call__(self, prompts, responses) -> list:
        seqs = [self.tokenize(p, r) for p, r in zip(prompts, responses)]
        pad, out = self.tokenizer.pad_token_id, []
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i : i + self.batch_size]
            input_ids = pad_right(chunk, pad).to(self.device)
            attention_mask = pad_right([[1] * len(s) for s in chunk], 0).to(self.device)
            out += sequence_rewards(self.model, input_ids, attention_mask).tolist()
        return out

    def __repr__(self):
        return f"RewardModelFn({os.fspath(self.path)!r})"
