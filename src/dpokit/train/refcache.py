"""Reference log-probs computed once: for held-out pairs in memory (the reference never changes, so
each evaluation would repeat the same work), and with `precompute_ref_log_probs` for the training
data too, cached on disk so that later runs (a sweep over beta, a resumed run) pay for it once.

The disk cache is keyed by a fingerprint of everything the numbers depend on: the reference weights
(every tensor's bytes), the token ids of every pair (which capture the data, the tokenizer, its chat
template and the truncation settings), the precision and the batch layout. A changed input is a new key, never a stale
hit.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from dpokit.data.layouts import collate_for, layout_name
from dpokit.logprobs import sequence_logps
from dpokit.models import cache_dir
from dpokit.report import log
from dpokit.train import loop


def fingerprint(model, examples, settings: str) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for p in examples:
        h.update(repr((p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
    h.update(settings.encode())  # precision and layout: both change the rounding of the numbers
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_reference_logps(reference, examples, pad_id, batch_size, device, precision, chunk_size=None,
                            layout="padded"):
    """(chosen (N,), rejected (N,)) log-probs of the reference on every pair, in the training layout (in
    bf16 layouts differ in rounding; the same layout makes pi = pi_ref give exactly zero rewards)."""
    collate = collate_for(layout, pad_id)
    was_training = reference.training
    reference.eval()
    chosen, rejected = [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        batch = loop.to_device(collate(chunk), device)
        with loop.autocast(device, precision):
            logps = sequence_logps(reference, batch, chunk_size=chunk_size)[0].float().cpu()
        chosen.append(logps[: len(chunk)])
        rejected.append(logps[len(chunk):])
    reference.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def attach(examples, chosen, rejected):
    for p, c, r in zip(examples, chosen.tolist(), rejected.tolist()):
        p.reference_logps = (c, r)


def attach_reference_logps(reference, examples, cfg, pad_id, device, use_disk_cache: bool):
    """Set `reference_logps` on every example, from the disk cache when it has them."""
    if not examples:
        return
    path = None
    layout = layout_name(cfg.padding_free, cfg.prefix_sharing)
    settings = f"{cfg.precision}|{layout}|{cfg.logprob_chunk_size}"
    if use_disk_cache:
        path = cache_dir() / "ref_logps" / f"{fingerprint(reference, examples, settings)}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            cached = load_file(path)
            attach(examples, cached["chosen"], cached["rejected"])
            log.info("reference log-probs of %d pairs from the cache (%s)", len(examples), path.name)
            return
    chosen, rejected = compute_reference_logps(reference, examples, pad_id, cfg.per_device_eval_batch_size,
                                               device, cfg.precision, cfg.logprob_chunk_size,
                                               layout)
    attach(examples, chosen, rejected)
    if path is not None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({"chosen": chosen, "rejected": rejected}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent run sees the whole file or none
        log.info("reference log-probs of %d pairs computed and cached (%s)", len(examples), path.name)
