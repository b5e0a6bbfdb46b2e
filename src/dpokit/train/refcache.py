"""Reference log-probs computed once: for held-out pairs in memory (the reference never changes, so
each evaluation would repeat the same work), and with `precompute_ref_log_probs` for the training
data too, cached on disk so that later runs (a sweep over beta, a resumed run) pay for it once.

The disk cache is keyed by a fingerprint of everything the numbers depend on: the reference weights
(every tensor's bytes), the token ids of every pair (which capture the data, the tokenizer, its chat
template and the truncation settings), the batch layout, chunking and batch size, and the precision as
resolved on this device (the autocast dtype, or none, and the device type). A changed input is a new
key, never a stale hit.

How close the cached numbers are to what a live reference would give in training. With policy = pi_ref
a live reference sees the very batch the policy sees, so the step-0 implicit rewards are exactly zero.
The cache can't see training's batches (a fresh random grouping every epoch), and the rounding of a
sequence's log-prob depends a little on which sequences share its batch (kernel blocking, the padded
length, the packed row's length). Measured on the embedded model, the first 32 pairs of data/sentiment,
the cache against a live reference in training's random batches of 4 (the slow test
tests/test_numerics.py::test_cached_reference_under_bf16_on_the_embedded_model checks the padded bound):
- fp32: they agree to ~1e-4 nats per sequence (padded <= 2e-5, prefix-shared packed <= 1e-4);
- bf16: the trunk rounds every activation to 8 bits of mantissa, differently in a different batch.
  Padded: max 0.024 nats, one sequence in 64 above 0.01 (0.31 before the output layer ran in fp32 and
  the cache used training's batch size). Prefix-shared packed, where a sequence shares a row with the
  whole batch: max 0.21, mean 0.034 (0.78 and 0.099 before). The step-0 implicit rewards are beta times
  that, not zero; a live reference (precompute_ref_log_probs off) keeps them exactly at zero. A cache
  in fp32 would not help: the live bf16 policy is itself ~0.1 nats (mean) off its fp32 values, so the
  rewards would start further from zero (0.6 max, padded).
To come as close as it can, the cache uses training's layout, chunking, precision and batch size
(`per_device_train_batch_size`, not the evaluation's), and the output layer in fp32 as training does.
Held-out pairs are cached in the evaluation's own grouping (`per_device_eval_batch_size`, in order, one
process), which reproduces what a live reference computes there exactly, in any precision.
"""

import dataclasses
import hashlib

import torch
import torch.distributed as dist

from dpokit.data.layouts import collate_for, layout_name
from dpokit.io import atomic_write
from dpokit.logprobs import resolve_chunk_size, sequence_logps
from dpokit.models import cache_dir
from dpokit.report import log
from dpokit.train.runtime import autocast, to_device


def fingerprint(model, examples, settings: str) -> str:
    """A key for the cache: the weights, the token ids, and `settings` (see reference_settings)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for p in examples:
        h.update(repr((p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
    h.update(settings.encode())  # precision, layout, batch size: all change the rounding of the numbers
    return h.hexdigest()[:32]


def reference_settings(cfg, device, batch_size: int) -> str:
    """What the numbers depend on besides weights and token ids. The precision as resolved here: the
    autocast dtype `autocast` gives on this device (or none), and the device type ("auto" may mean
    bf16 on one machine and fp32 on another; a GPU and a CPU round differently)."""
    device = torch.device(device)
    with autocast(device, cfg.precision):
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    layout = layout_name(cfg.padding_free, cfg.prefix_sharing)
    return f"{device.type}|{dtype}|{layout}|{cfg.logprob_chunk_size}|batch {batch_size}|fp32 head"


@torch.no_grad()
def pair_logps(model, examples, pad_id, batch_size, device, precision, chunk_size=None, layout="padded"):
    """(chosen (N,), rejected (N,)) log-probs of a model (the reference, or in `dpokit eval` the policy) on
    every pair, batch_size pairs at a time
    in order, in the given layout and precision, as training computes them (see the module docstring for
    how close to a live reference that comes)."""
    collate = collate_for(layout, pad_id)
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = to_device(collate(chunk), device)
        with autocast(device, precision):
            logps = sequence_logps(model, batch, chunk_size=chunk_size)[0].float().cpu()
        chosen.append(logps[: len(chunk)])
        rejected.append(logps[len(chunk) :])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def shared_pair_logps(model, examples, pad_id, batch_size, device, precision, chunk_size=None, layout="padded"):
    """pair_logps with its batches dealt out over torchrun's ranks (rank r computes batches r, r + world,
    ...) and gathered on every rank: the very batches one process would compute, so the same numbers,
    in 1/world of the time. The model here is whole on every rank (sharding comes later, in the loop)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return pair_logps(model, examples, pad_id, batch_size, device, precision, chunk_size, layout)
    starts = list(range(0, len(examples), batch_size))[dist.get_rank() :: world]
    mine = {
        s: pair_logps(model, examples[s : s + batch_size], pad_id, batch_size, device, precision, chunk_size, layout)
        for s in starts
    }
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    parts = dict(kv for part in everyone for kv in part.items())  # {first example: (chosen (b,), rejected (b,))}
    order = sorted(parts)
    return torch.cat([parts[s][0] for s in order]), torch.cat([parts[s][1] for s in order])


def attach(examples, chosen, rejected):
    if hasattr(examples, "set_reference_logps"):  # a PairTable builds its pairs on demand: it keeps them
        examples.set_reference_logps(chosen.tolist(), rejected.tolist())
        return
    for p, c, r in zip(examples, chosen.tolist(), rejected.tolist()):
        p.reference_logps = (c, r)


def attach_reference_logps(reference, examples, cfg, pad_id, device, use_disk_cache: bool, batch_size=None):
    """Set `reference_logps` on every example, from the disk cache when it has them. batch_size: pairs
    per forward; by default per_device_train_batch_size for the training data (the disk-cached call, as
    dpo.run makes it) and per_device_eval_batch_size for held-out data (the evaluation's grouping)."""
    if not examples:
        return
    if cfg.logprob_chunk_size == 0:  # "automatic", not yet resolved for this model by the caller (dpo() does)
        cfg = dataclasses.replace(cfg, logprob_chunk_size=resolve_chunk_size(reference, 0))
    path = None
    layout = layout_name(cfg.padding_free, cfg.prefix_sharing)
    if batch_size is None:
        batch_size = cfg.per_device_train_batch_size if use_disk_cache else cfg.per_device_eval_batch_size
    settings = reference_settings(cfg, device, batch_size)
    if use_disk_cache:
        path = cache_dir() / "ref_logps" / f"{fingerprint(reference, examples, settings)}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            cached = load_file(path)
            attach(examples, cached["chosen"], cached["rejected"])
            log.info("reference log-probs of %d pairs from the cache (%s)", len(examples), path.name)
            return
    chosen, rejected = shared_pair_logps(
        reference, examples, pad_id, batch_size, device, cfg.precision, cfg.logprob_chunk_size, layout
    )
    attach(examples, chosen, rejected)
    if path is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        from safetensors.torch import save_file

        # atomic: a concurrent run sees the whole file or none
        atomic_write(path, lambda tmp: save_file({"chosen": chosen, "rejected": rejected}, str(tmp)))
        log.info("reference log-probs of %d pairs computed and cached (%s)", len(examples), path.name)
