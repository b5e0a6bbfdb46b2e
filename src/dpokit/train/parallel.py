"""How one model is spread over torchrun's processes, and the sharded checkpoints that go with it.

- ddp: torch's DistributedDataParallel. Every process holds the whole model, its gradients and its
  optimizer state; gradients are all-reduced once per optimizer step (on the last micro-batch).
- fsdp: PyTorch's FSDP2, `torch.distributed.fsdp.fully_shard` (as torchtitan applies it): each decoder
  layer is one unit and the root (embeddings, final norm, output layer) another. Each process keeps
  1/world of every parameter, gradient and optimizer moment; a unit's parameters are all-gathered just
  before its forward (and again before its backward when resharded after the forward), and its gradients
  reduce-scattered (averaged over ranks, as DDP does) after its backward. The frozen reference is
  sharded the same way, with no gradients and no optimizer. Gradients are reduce-scattered at every
  micro-batch (no unsharded gradient is kept across micro-batches: memory, not communication, is what
  fsdp is for).

Precision under fsdp: with bf16 the decoder layers compute in bf16 (`MixedPrecisionPolicy`: bf16
parameters in compute, fp32 gradient reduction, fp32 sharded master weights); the root unit stays in
fp32 so that the output layer keeps logprobs.py's fp32-head contract (the head's logits in fp32).

Checkpoints under fsdp (`save_sharded`): the model, optimizer and any moving model of the step (TR-DPO's
reference) as one `torch.distributed.checkpoint` (DCP) directory `dcp/` inside the usual atomic
checkpoint directory (train/checkpoint.py: temporary directory, manifest, rank 0's rename). Every rank
writes its shards into a staging directory; after a barrier rank 0 moves it into the checkpoint it
assembles and renames into place. DCP stores each tensor with its global shape, so a checkpoint saved
by 2 ranks loads into 1 rank (sharded or not) and the other way round. Each checkpoint (and the final
model) is also a plain HF safetensors directory, gathered to rank 0 one tensor at a time
(`full_state_dict`).
"""

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dpokit.errors import UserError
from dpokit.logprobs import unwrap
from dpokit.precision import resolve_for as resolve_precision
from dpokit.train import checkpoint
from dpokit.train.runtime import Ranks

DCP_DIR = "dcp"  # the sharded state inside a checkpoint directory


def wrap(model, cfg, ranks: Ranks):
    """The model the loop trains: the model itself (one process), inside DDP, or sharded in place (fsdp)."""
    if getattr(cfg, "parallelism", "ddp") == "fsdp":
        return shard(model, cfg, ranks, trainable=True)
    if ranks.world > 1:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None
        )
    return model


def decoder_layers(model) -> list:
    """The model's repeated blocks: the modules whose class transformers names in _no_split_modules
    (LlamaDecoderLayer, Qwen2DecoderLayer, ...), found inside PEFT wrappers too."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(
            f"parallelism=fsdp: {type(unwrap(model)).__name__} names no decoder layer class "
            "(_no_split_modules) to shard by; use parallelism=ddp"
        )
    return layers


def shard(model, cfg, ranks: Ranks, trainable: bool = True):
    """fully_shard each decoder layer, then the root; in place (the module's parameters become DTensor
    shards), returned for convenience. A frozen model (the reference) reshards everything after its
    forward: it has no backward to keep parameters for."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if is_sharded(model):
        return model
    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    bf16 = resolve_precision(ranks.device, cfg.precision) == "bf16"
    layer_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    offload = CPUOffloadPolicy(pin_memory=ranks.device.type == "cuda") if cfg.fsdp_cpu_offload else OffloadPolicy()
    after = cfg.fsdp_reshard_after_forward or not trainable
    for layer in decoder_layers(model):
        fully_shard(
            layer,
            mesh=mesh,
            reshard_after_forward=after,
            mp_policy=layer_mp or MixedPrecisionPolicy(),
            offload_policy=offload,
        )
    # the root stays gathered from its forward to its backward when training: logprobs.py's chunked head
    # multiplies the output layer's weight inside the forward and differentiates it in the backward
    fully_shard(model, mesh=mesh, reshard_after_forward=not trainable, offload_policy=offload)
    return model


def shard_frozen(step, cfg, ranks: Ranks):
    """Shard the step's reference model like the policy (fsdp only; nothing otherwise)."""
    reference = getattr(step, "reference", None)
    if getattr(cfg, "parallelism", "ddp") == "fsdp" and isinstance(reference, torch.nn.Module):
        shard(reference.to(ranks.device), cfg, ranks, trainable=False)


def is_sharded(model) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def no_sync(model, last: bool):
    """The context of one micro-batch's backward: DDP all-reduces only on the last one; fsdp and a
    single process need nothing."""
    import contextlib

    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params, max_norm: float) -> float:
    """torch's clip_grad_norm_, whose total norm is a replicated DTensor under fsdp."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


@torch.no_grad()
def full_state_dict(model, main: bool) -> dict:
    """{name: CPU tensor} of a sharded model's whole state on rank 0 (`main`), {} elsewhere: gathered
    one tensor at a time, so no rank ever holds a second whole copy on its device and only rank 0 one
    in CPU memory. A tied parameter (an output layer sharing the embedding) is kept under its first name
    only, as save_pretrained writes it (from_pretrained ties it again). Every rank must call this (each
    gather is a collective)."""
    out, done = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():  # (keep_vars: a tied parameter is one object)
        if id(t) in done:
            continue
        done.add(id(t))
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if main:
            out[name] = full.detach().to("cpu", copy=True)
        del full
    return out


# --- DCP ----------------------------------------------------------------------------------------------


def _dcp_state(model, optimizer, moving: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd, **{k: get_model_state_dict(m) for k, m in moving.items()}}


def save_dcp(directory: Path, model, optimizer, moving: dict):
    """Every rank writes its shards of model, optimizer and the `moving` models into `directory`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(model, optimizer, moving), checkpoint_id=str(directory))


def load_dcp(directory: Path, model, optimizer, moving: dict):
    """Load a DCP directory into the model, optimizer and `moving` models, whatever the number of
    processes (and whether they are sharded) when it was saved and now."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _dcp_state(model, optimizer, moving)
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    for k, m in moving.items():
        set_model_state_dict(m, state[k])


def load_unsharded_checkpoint(path: Path, model, optimizer, moving: dict):
    """A checkpoint written by a run without sharding (model*.safetensors, optimizer.pt indexed by
    parameter position, `<name>.safetensors` of the moving models) into a sharded model: every rank
    reads the whole tensors and keeps its shard (1 -> N processes)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    if (path / "adapter_model.safetensors").is_file():
        raise UserError(
            f"{path}: a LoRA checkpoint of a run without fsdp resumes with parallelism=ddp only "
            "(a LoRA checkpoint written under fsdp resumes either way)"
        )
    full = StateDictOptions(full_state_dict=True, strict=False)
    weights = {}
    for f in sorted(path.glob("model*.safetensors")):
        weights.update(load_file(f))
    result = set_model_state_dict(model, weights, options=full)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise UserError(f"{path}: checkpoint does not match the model ({sorted(result.missing_keys)[:3]} missing)")
    # optimizer.pt numbers the parameters in the order the optimizer was given them: the trainable
    # parameters in named_parameters() order, the same names sharded or not
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    by_name = {
        "state": {names[i]: v for i, v in saved["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    for name, m in moving.items():
        set_model_state_dict(m, load_file(path / f"{name}.safetensors"), options=full)


def is_dcp_checkpoint(path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def save_sharded(
    out: Path, step_no: int, model, optimizer, trainer_state: dict, write_model, moving: dict, limit, ranks: Ranks
):
    """A checkpoint of a sharded run, called by every rank; returns its path on rank 0 (None elsewhere).

    write_model(directory, state_dict): rank 0 writes the HF directory (weights, tokenizer) from the
    gathered state dict. The staging directory's name matches checkpoint.sweep_temporary's pattern, so a
    kill before the rename leaves nothing the next run keeps."""
    staging = Path(out) / f".{checkpoint.PREFIX}{step_no}.dcp.tmp"
    if ranks.main:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    save_dcp(staging, model, optimizer, moving)
    full = full_state_dict(model, ranks.main)
    dist.barrier()  # every rank's shards are on disk before rank 0 moves them
    path = None
    if ranks.main:

        def write(directory):
            write_model(directory, full)
            os.rename(staging, Path(directory) / DCP_DIR)

        try:
            path = checkpoint.save_checkpoint(out, step_no, write, None, trainer_state, limit)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path
