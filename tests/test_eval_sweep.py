"""`dpokit eval` for sweeps: prompts without pairs, the KL on the reward's own samples at temperature 1
(checked against log-probs computed here from a plain forward), the reference's side cached and reused,
the paired reward difference, and the extra reference samples for the oracle and best-of-n."""

import json

import pytest
import torch
from conftest import REVIEWS, write_jsonl
from transformers import AutoModelForCausalLM

from dpokit.commands import evaluate as ev
from dpokit.data.prompts import tokenize_prompt
from dpokit.estimators import mean_se
from dpokit.sampling import sample_responses
from dpokit.train.runtime import set_seed

CALLS = []


def counting_reward(prompts, responses):
    """Length in characters / 10, counting how many responses it scored (`test_eval_sweep:counting_reward`)."""
    CALLS.append(len(responses))
    return [len(r) / 10 for r in responses]


@pytest.fixture(scope="module")
def perturbed(tiny_model_dir, tmp_path_factory):
    """The tiny model with noise on its weights: a policy whose KL to the tiny model is not 0."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(out)
    from dpokit.models import load_tokenizer

    load_tokenizer(str(tiny_model_dir)).save_pretrained(out)
    return out


def test_eval_on_prompts_with_the_kl_of_its_own_samples_and_a_cached_reference(
    tiny_model_dir, perturbed, smol_tokenizer, tmp_path
):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p + "\n"} for p, _, _ in REVIEWS[:6]])
    cache = tmp_path / "cache"
    keys = dict(
        model=str(perturbed),
        ref_model=str(tiny_model_dir),
        prompts=str(prompts),
        reward="test_eval_sweep:counting_reward",
        num_samples=5,
        max_new_tokens=6,
        temperature=1.0,
        precision="fp32",
        reference_cache=str(cache),
        reference_samples_per_prompt=4,
        output_file=str(tmp_path / "a.json"),
    )
    CALLS.clear()
    first = ev.evaluate(keys)
    assert "pairs" not in first and first["num_samples"] == 5
    assert CALLS == [5, 20, 5]  # the reference's samples, its 4 more per prompt, the policy's
    assert len(list(cache.glob("reference-*.json"))) == 1
    ref, pol = first["reference"], first["policy"]
    assert len(ref["rewards_per_prompt"]) == 5 and all(len(r) == 4 for r in ref["rewards_per_prompt"])
    # the KL on the policy's own samples, from log-probs computed here
    policy = AutoModelForCausalLM.from_pretrained(perturbed).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = [tokenize_prompt(smol_tokenizer, p + "\n") for p, _, _ in REVIEWS[:5]]
    set_seed(0)
    responses = sample_responses(policy, smol_tokenizer, ids, 6, 1.0)
    expected = []
    with torch.no_grad():
        for p, r in zip(ids, responses):
            x = torch.tensor([p + r])
            lp, lq = (m(x).logits[0, len(p) - 1 : -1].log_softmax(-1) for m in (policy, reference))
            t = torch.tensor(r)
            expected.append(float(lp.gather(-1, t[:, None]).sum() - lq.gather(-1, t[:, None]).sum()))
    assert pol["per_prompt"]["kl"] == pytest.approx(expected, abs=1e-4)
    assert (pol["kl"], pol["kl_se"]) == pytest.approx(mean_se(expected), abs=1e-4)
    texts = [smol_tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    assert pol["per_prompt"]["reward"] == pytest.approx([len(t) / 10 for t in texts])
    diffs = [a - b for a, b in zip(pol["per_prompt"]["reward"], ref["per_prompt"]["reward"])]
    assert (pol["reward_diff"], pol["reward_diff_se"]) == pytest.approx(mean_se(diffs))
    assert 0 <= pol["finished"] <= 1 and first["kl_estimator"] == ev.KL_SAME_SAMPLES
    # a second policy: the reference's side comes from the cache (only the policy's samples are scored)
    CALLS.clear()
    second = ev.evaluate({**keys, "model": str(tiny_model_dir), "output_file": str(tmp_path / "b.json")})
    assert CALLS == [5]
    assert second["reference"] == first["reference"]
    # the reference against itself: the same seeded samples, so the reward difference is exactly 0, and the
    # KL is 0 up to fp32 rounding (the policy's side summed from generate's cached logits, the reference's
    # from a forward)
    assert second["policy"]["reward_diff"] == 0.0 and second["policy"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert max(map(abs, second["policy"]["per_prompt"]["kl"])) < 1e-4
    assert json.loads((tmp_path / "b.json").read_text())["reference_fingerprint"] == first["reference_fingerprint"]


def test_eval_with_pairs_keeps_their_metrics_beside_the_sampled_ones(tiny_model_dir, pref_dir, tmp_path):
    """Pairs and prompts together: each side has its implicit-reward metrics and its sampled ones."""
    results = ev.evaluate(
        dict(
            model=str(tiny_model_dir),
            ref_model=str(tiny_model_dir),
            dataset=str(pref_dir),
            reward="test_eval_sweep:counting_reward",
            num_samples=3,
            max_new_tokens=3,
            output_file=str(tmp_path / "e.json"),
        )
    )
    assert results["pairs"] == 8 and results["num_samples"] == 3
    for side in ("reference", "policy"):
        assert {"implicit_reward_accuracy", "reward", "reward_se", "finished", "kl"} <= set(results[side])
    assert results["policy"]["implicit_reward_accuracy"] == 0.5  # the reference itself: every margin a tie


def test_eval_needs_prompts_or_pairs(capsys):
    from dpokit.cli import main

    assert main(["eval", "model=x"]) == 2
    assert "key 'dataset' (or 'prompts') is required" in capsys.readouterr().err
