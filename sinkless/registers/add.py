"""Putting register tokens into a pretrained ViT: ``add_registers`` (Darcet et al. 2024, "Vision Transformers
Need Registers"; the starting point of PH-Reg's self-distillation, Chen et al. 2025).

Registers are ``n`` learned tokens placed right after CLS (``[CLS, reg × n, patches]``; models without a
CLS token, SigLIP, get them first), added after the position embeddings so they get none, initialised
small (N(0, std²), Darcet: std 1e-6). Every pretrained weight is kept: the result holds the same tensors
plus ``register_tokens``. The input model is never modified; ``add_registers`` returns a new model.

Two mechanisms, one behaviour:

- ``Dinov2Model`` becomes a native Hugging Face ``Dinov2WithRegistersModel`` (same weights +
  ``embeddings.register_tokens``), so ``save_pretrained`` folders load with plain transformers, no sinkless
  needed. One difference is HF's, not ours: that class interpolates position embeddings with
  ``antialias=True`` (as DINOv2's own "reg" models do), ``Dinov2Model`` without. At the model's native
  resolution (no interpolation) the two agree exactly; elsewhere outputs move slightly (measured in
  docs/RESULTS.md, "Registers by training").
- ``ViTModel``, ``CLIPVisionModel`` and ``SiglipVisionModel`` have no register class in transformers. They
  get ``embeddings.register_tokens`` (a parameter of the embeddings module, so ``save_pretrained`` writes
  it), a persistent ``sinkless.hooks`` edit on the embeddings output that inserts the tokens, and
  ``config.num_register_tokens`` (what the adapter's token layout reads). Such folders load back with
  their registers through sinkless (``sinkless.zoo.load(path)``, any ``--model PATH``); plain
  transformers loads the model without them (and warns about the unused ``register_tokens`` weight).
  ``remove_registers(model)`` takes the hook and the tokens off again.

Shapes: B batch, N tokens, R registers, D width.
"""

from __future__ import annotations

import copy
import inspect
import json
import numbers
import logging
from pathlib import Path

import torch
from torch import nn

from sinkless.adapters import Adapter, Modality, adapter_for
from sinkless.errors import SinklessError
from sinkless.hooks import Hooks, ModuleEdit

__all__ = ["add_registers", "remove_registers", "restore_registers", "register_parameter_name", "register_hook_ids", "DARCET_STD",
           "CONFIG_FIELD"]

log = logging.getLogger(__name__)

DARCET_STD = 1e-6  # Darcet et al.'s init of register tokens
CONFIG_FIELD = "num_register_tokens"  # the config field the adapters' token layout reads
_HOOKED = ("vit", "clip_vision", "siglip_vision")  # families without a register class in transformers
_NATIVE = ("dinov2", "dinov2_with_registers")
_HANDLE = "_sinkless_registers"  # attribute of a hooked model holding its Hooks handle


def _embeddings_path(adapter: Adapter) -> str:
    """The embeddings module: the parent of the patch embedding (``embeddings`` / ``vision_model.embeddings``)."""
    assert adapter.patch_embed is not None, adapter.family
    return adapter.patch_embed.rpartition(".")[0]


def register_parameter_name(model: nn.Module) -> str:
    """Name of the register-token parameter in ``model.state_dict()`` (e.g. ``embeddings.register_tokens``)."""
    return f"{_embeddings_path(_supported(model))}.register_tokens"


def _supported(model: nn.Module) -> Adapter:
    if not isinstance(model, nn.Module):
        raise SinklessError(f"add_registers needs a model (torch module), got {type(model).__name__}",
                            fix="pass loaded.model, or a model from transformers' from_pretrained")
    adapter = adapter_for(model)  # unsupported architecture -> a clear error listing the supported ones
    supported = "Dinov2Model, Dinov2WithRegistersModel, ViTModel, CLIPVisionModel or SiglipVisionModel"
    if adapter.modality is not Modality.VISION:
        raise SinklessError(f"registers are tokens of a vision transformer; {type(model).__name__} is a {adapter.modality.value} model",
                            fix=f"use a {supported}")
    if adapter.family not in (*_NATIVE, *_HOOKED):
        raise SinklessError(f"adding registers to {type(model).__name__} is not supported (unsupported family {adapter.family!r})",
                            fix=f"use a {supported}")
    if adapter.inferred:  # read from the module tree: a head or backbone around the base model, which add_registers would break
        raise SinklessError(f"adding registers to {type(model).__name__} is not supported (only the base vision models, not one with a head or a backbone wrapper)",
                            fix=f"pass its base model (e.g. model.vit), a {supported}")
    return adapter


def _check_count(n, model: nn.Module, adapter: Adapter) -> int:
    """``n`` as an int: a whole number >= 1 (numpy's too) and at most the model's patches at its own image size."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise SinklessError(f"the number of registers must be a whole number >= 1, got {n!r}", fix="e.g. 4 (Darcet et al.) or 16 (PH-Reg)")
    size = getattr(model.config, "image_size", None)
    patches = (int(size) // adapter.patch_size(model)) ** 2 if isinstance(size, int) else None
    if patches and n > patches:
        raise SinklessError(f"{int(n)} registers are more tokens than the model's {patches} patches at its image size {size}",
                            fix="e.g. 4 (Darcet et al.) or 16 (PH-Reg)")
    return int(n)


def _init_tokens(n: int, width: int, std: float, seed: int, like: torch.Tensor) -> torch.Tensor:
    if not std >= 0:
        raise SinklessError(f"register init std must be >= 0, got {std}")
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, n, width, generator=generator) * std).to(device=like.device, dtype=like.dtype)  # (1, R, D)


@torch.no_grad()
def add_registers(model: nn.Module, n: int = 4, *, std: float = DARCET_STD, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with ``n`` register tokens after CLS; every pretrained weight kept.

    ``Dinov2Model`` -> ``Dinov2WithRegistersModel`` (plain transformers loads its ``save_pretrained``
    folder); ``Dinov2WithRegistersModel`` gets ``n`` more; ``ViTModel`` / ``CLIPVisionModel`` /
    ``SiglipVisionModel`` get a documented hook (see the module docstring). New tokens are drawn from
    N(0, std²) with ``seed``. The returned model is in the input's train/eval mode, device and dtype.
    """
    adapter = _supported(model)
    n = _check_count(n, model, adapter)
    reference = next(model.parameters())
    if adapter.family in _NATIVE:
        new = _to_dinov2_with_registers(model, adapter, n, std, seed, reference)
    else:
        new = _hooked_copy(model, adapter, n, std, seed, reference)
    new.to(device=reference.device, dtype=reference.dtype)
    new.train(model.training)
    return new


def _to_dinov2_with_registers(model: nn.Module, adapter: Adapter, n: int, std: float, seed: int, reference: torch.Tensor) -> nn.Module:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = model.config.to_dict()
    old = int(config.get(CONFIG_FIELD, 0) or 0) if adapter.family == "dinov2_with_registers" else 0
    for key in ("model_type", "architectures", "use_mask_token", "transformers_version", CONFIG_FIELD):
        config.pop(key, None)
    new_config = Dinov2WithRegistersConfig(**config, **{CONFIG_FIELD: old + n})
    new_config.architectures = ["Dinov2WithRegistersModel"]
    new_config._attn_implementation = model.config._attn_implementation
    new = Dinov2WithRegistersModel(new_config)
    state = model.state_dict()
    tokens = _init_tokens(n, new_config.hidden_size, std, seed, reference)
    if old:
        tokens = torch.cat([state["embeddings.register_tokens"], tokens], dim=1)  # (1, old + n, D)
    state["embeddings.register_tokens"] = tokens
    if "embeddings.mask_token" not in state:  # Dinov2Model(use_mask_token=False): the registers class always has one
        state["embeddings.mask_token"] = torch.zeros_like(new.embeddings.mask_token)
    result = new.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result  # same module tree, same names
    return new


def _hooked_copy(model: nn.Module, adapter: Adapter, n: int, std: float, seed: int, reference: torch.Tensor) -> nn.Module:
    # a fresh model from the config + the weights: the user's hooks (and ours) are not copied along
    config = copy.deepcopy(model.config)
    old = int(getattr(config, CONFIG_FIELD, 0) or 0)
    setattr(config, CONFIG_FIELD, 0)
    new = type(model)(config, **_constructor_options(model))
    state = model.state_dict()
    name = register_parameter_name(model)
    previous = state.pop(name, None)
    result = new.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:  # a module tree the config alone does not rebuild
        raise SinklessError(
            f"cannot rebuild this {type(model).__name__} from its config (weights missing: {result.missing_keys[:3]}, "
            f"unexpected: {result.unexpected_keys[:3]})",
            fix="pass the model as from_pretrained builds it (a ViTModel, CLIPVisionModel or SiglipVisionModel)",
        )
    tokens = _init_tokens(n, int(config.hidden_size), std, seed, reference)
    if old and previous is not None:
        tokens = torch.cat([previous.to(tokens), tokens], dim=1)  # (1, old + n, D)
    _attach(new, adapter_for(new), tokens)
    return new


def _constructor_options(model: nn.Module) -> dict:
    """The constructor arguments besides the config that ``model`` was built with, read off its modules
    (``ViTModel(config, add_pooling_layer=..., use_mask_token=...)``)."""
    accepted = inspect.signature(type(model).__init__).parameters
    options = {}
    if "add_pooling_layer" in accepted:
        options["add_pooling_layer"] = getattr(model, "pooler", None) is not None
    if "use_mask_token" in accepted:
        options["use_mask_token"] = getattr(getattr(model, "embeddings", None), "mask_token", None) is not None
    return options


def _attach(model: nn.Module, adapter: Adapter, tokens: torch.Tensor) -> None:
    """Give a ViT/CLIP/SigLIP model ``tokens`` (1, R, D) as registers: parameter, hook, config field."""
    path = _embeddings_path(adapter)
    embeddings = model.get_submodule(path)
    embeddings.register_parameter("register_tokens", nn.Parameter(tokens))
    embeddings.sinkless_n_cls = adapter.n_cls  # where the registers go: right after CLS
    setattr(model, _HANDLE, Hooks(model, edit={f"{path}:output": ModuleEdit(_insert_registers)}))
    setattr(model.config, CONFIG_FIELD, int(tokens.shape[1]))


def _insert_registers(embeddings: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) embeddings output -> (B, N + R, D) with ``embeddings``' own register tokens after CLS (a
    ``ModuleEdit``: a ``copy.deepcopy`` of the model inserts the copy's tokens)."""
    registers = embeddings.register_tokens.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, R, D)
    n_cls = embeddings.sinkless_n_cls
    return torch.cat([x[:, :n_cls], registers, x[:, n_cls:]], dim=1)


def register_hook_ids(model: nn.Module) -> set[int]:
    """The ids of the hooks that insert ``model``'s added registers (ViT/CLIP/SigLIP; empty otherwise): what code
    that strips a copy's hooks must keep."""
    handle = getattr(model, _HANDLE, None)
    return handle.hook_ids if handle is not None else set()


def remove_registers(model: nn.Module) -> None:
    """Take hooked registers (ViT/CLIP/SigLIP) off ``model`` again: hook, parameter and config field."""
    handle = getattr(model, _HANDLE, None)
    if handle is None:
        raise SinklessError(f"this {type(model).__name__} carries no registers added by sinkless",
                            fix="a Dinov2WithRegistersModel keeps its registers (they are part of the class)")
    handle.remove()
    delattr(model, _HANDLE)
    embeddings = model.get_submodule(_embeddings_path(adapter_for(model)))
    del embeddings.register_tokens
    del embeddings.sinkless_n_cls
    if hasattr(model.config, CONFIG_FIELD):
        delattr(model.config, CONFIG_FIELD)


# -- reloading hooked registers --------------------------------------------------------------------
def _read_tensor(source: str, name: str) -> torch.Tensor | None:
    """One tensor of a ``save_pretrained`` folder (or hub id): single or sharded safetensors."""
    from safetensors import safe_open

    def local(file: str) -> Path | None:
        folder = Path(source).expanduser()
        if folder.is_dir():
            path = folder / file
            return path if path.exists() else None
        try:
            from transformers.utils import cached_file

            found = cached_file(source, file, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None
        return Path(found) if found else None

    index = local("model.safetensors.index.json")
    if index is not None:
        shard = json.loads(index.read_text()).get("weight_map", {}).get(name)
        path = local(shard) if shard else None
    else:
        path = local("model.safetensors")
    if path is None:
        return None
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name) if name in handle.keys() else None


@torch.no_grad()
def restore_registers(model: nn.Module, source: str) -> nn.Module:
    """Re-attach the registers of a ViT/CLIP/SigLIP folder saved with sinkless registers (no-op otherwise).

    Called by ``sinkless.zoo`` after ``from_pretrained``, which drops the unknown ``register_tokens`` weight.
    """
    adapter = adapter_for(model)
    n = int(getattr(model.config, CONFIG_FIELD, 0) or 0)
    if adapter.family not in _HOOKED or n == 0 or getattr(model, _HANDLE, None) is not None:
        return model
    name = register_parameter_name(model)
    tokens = _read_tensor(source, name)
    if tokens is None or tokens.shape[:2] != (1, n):
        raise SinklessError(
            f"{source}: config.json announces {n} register tokens but the weights hold no matching {name!r}",
            fix="re-save the model with sinkless (add_registers / distill), or remove num_register_tokens from config.json",
        )
    setattr(model.config, CONFIG_FIELD, 0)
    reference = next(model.parameters())
    _attach(model, adapter, tokens.to(device=reference.device, dtype=reference.dtype))
    log.debug("restored %d register tokens of %s", n, source)
    return model
