"""The one primitive for looking inside and editing a model: forward hooks on named sites.

A *site* names a tensor flowing through a module, written ``"<module path>:<port>"``:

- ``"encoder.layer.3.mlp.fc2:input"``  the first input of the module (a forward pre-hook),
- ``"encoder.layer.3:output"``         its output, or the output's first element when it is a tuple,
- ``"encoder.layer.3.attention:output[1]"``  element 1 of a tuple output (attention probabilities),
- ``"model:input[attention_mask]"``  a keyword input of the module (skipped when not passed),
- ``"model:input[*]"`` / ``"model:output[*]"``  the whole call: an edit receives every input as a
  dict of keyword arguments (positional ones under their parameter names) and returns the new dict,
  or the whole output object and returns its replacement (edits only, for inputs that must change
  together, e.g. a cache's positions and mask).

``Hooks`` attaches capture and edit hooks at once. Used with ``with`` it removes every handle on
exit, exception or not; kept as a persistent edit it is removed by ``.remove()``. Everything else in
sinkless (scans, test-time registers, probes) is built on it (TransformerLens ``hooks()``, timm
``FeatureHooks``).
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Site", "Hooks", "hooks", "stop_after", "Edit", "ModuleEdit", "Reduce"]

Edit = Callable[[torch.Tensor], torch.Tensor]
"""A function that receives the tensor at a site and returns its replacement (same or new shape)."""

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModuleEdit:
    """An edit that is also given the module it runs on: ``fn(module, tensor) -> tensor``.

    A persistent edit that reads the module's own parameters should be one: a closure over the module would
    follow it into ``copy.deepcopy(model)``, where the copy's hook would still read the original's parameters
    (functions are not copied); ``fn`` is handed whichever module is running.
    """

    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""A function applied to a captured tensor before it is stored (e.g. token norms), to save memory."""

_SITE = re.compile(r"^(?P<module>[\w.]*):(?P<port>input|output)(?:\[(?:(?P<index>\d+)|(?P<key>[A-Za-z_]\w*|\*))\])?$")
_WHOLE = "*"


@dataclass(frozen=True)
class Site:
    """A parsed site: module path, port (``input``/``output``), optional tuple index or keyword name."""

    module: str
    port: str
    index: int | None = None
    key: str | None = None

    @classmethod
    def parse(cls, spec: str | Site) -> Site:
        if isinstance(spec, Site):
            return spec
        match = _SITE.match(spec)
        if match is None:
            raise ValueError(
                f"bad hook site {spec!r}: expected '<module path>:input', '<module path>:output' "
                "'<module path>:output[i]' or '<module path>:input[keyword]', e.g. 'encoder.layer.3.mlp.fc2:input'"
            )
        index, key = match["index"], match["key"]
        if key is not None and key != _WHOLE and match["port"] != "input":
            raise ValueError(f"bad hook site {spec!r}: named entries are keyword inputs, e.g. 'model:input[attention_mask]'")
        if index is not None and match["port"] != "output":
            raise ValueError(f"bad hook site {spec!r}: indices are only for outputs")
        return cls(match["module"], match["port"], None if index is None else int(index), key)

    def __str__(self) -> str:
        suffix = f"[{self.key}]" if self.key is not None else "" if self.index is None else f"[{self.index}]"
        return f"{self.module}:{self.port}{suffix}"


def _resolve(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        parent = path.rpartition(".")[0]
        try:
            children = [name for name, _ in model.get_submodule(parent).named_children()]
        except AttributeError:
            children = [name for name, _ in model.named_children()]
        raise ValueError(
            f"{type(model).__name__} has no module {path!r}; children of {parent or '<root>'!r}: {children}"
        ) from None


def _get(value: Any, index: int | None) -> torch.Tensor:
    """The tensor a site refers to inside a module's output (tensor, tuple or ModelOutput)."""
    if isinstance(value, torch.Tensor):
        if index not in (None, 0):
            raise ValueError(f"site asks for element {index} of an output that is a single tensor")
        return value
    item = value[index or 0]
    if not isinstance(item, torch.Tensor):
        raise ValueError(
            f"element {index or 0} of this output is {type(item).__name__}, not a tensor"
            " (attention probabilities are None unless eager attention is on: see adapters.eager_attention)"
        )
    return item


def _put(value: Any, index: int | None, new: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return new
    i = index or 0
    if isinstance(value, tuple):
        return value[:i] + (new,) + value[i + 1 :]
    if isinstance(value, list):
        return value[:i] + [new] + value[i + 1 :]
    # ModelOutput: an ordered dict that also supports integer indexing
    key = list(value.keys())[i]
    value[key] = new
    return value


class Hooks(Mapping[str, torch.Tensor]):
    """Capture and/or edit activations at named sites of ``model``.

    Args:
        model: any ``nn.Module``; it is never modified beyond the hooks, which ``remove`` takes off.
        capture: sites to record, or a mapping site -> reducer applied before storing (e.g. a norm).
        edit: mapping site -> function returning the replacement tensor. An edit runs before the
            capture at the same site, so captures see edited values.
        to_cpu: move captured tensors to the CPU.
        detach: store captured tensors detached from the autograd graph (default). Pass False
            to optimise through captured values (e.g. attention probabilities).

    Captured tensors are read as ``hooks[site]`` (the last forward call) or ``hooks.calls(site)``
    (one tensor per call, e.g. per generated token).
    """

    def __init__(
        self,
        model: nn.Module,
        capture: Iterable[str] | Mapping[str, Reduce | None] = (),
        edit: Mapping[str, Edit] | None = None,
        *,
        to_cpu: bool = False,
        detach: bool = True,
    ) -> None:
        reducers = dict(capture) if isinstance(capture, Mapping) else {spec: None for spec in capture}
        self._store: dict[str, list[torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._to_cpu = to_cpu
        self._detach = detach
        try:
            for spec, fn in (edit or {}).items():
                self._attach(model, Site.parse(spec), edit=fn)
            for spec, reducer in reducers.items():
                site = Site.parse(spec)
                self._store[str(site)] = []
                self._attach(model, site, reducer=reducer)
        except BaseException:
            self.remove()
            raise

    # -- attaching ---------------------------------------------------------------------------
    def _attach(
        self,
        model: nn.Module,
        site: Site,
        *,
        edit: Edit | None = None,
        reducer: Reduce | None = None,
    ) -> None:
        module = _resolve(model, site.module)
        key = str(site)
        if site.key == _WHOLE:
            if edit is None:
                raise ValueError(f"site {key}: the whole call can be edited, not captured")
            if isinstance(edit, ModuleEdit):
                raise ValueError(f"site {key}: a whole-call edit takes no module (use a tensor site)")
            self._attach_whole(module, site.port, edit)
            return

        def handle(tensor: torch.Tensor, running: nn.Module) -> torch.Tensor | None:
            if edit is not None:
                return edit.fn(running, tensor) if isinstance(edit, ModuleEdit) else edit(tensor)
            stored = tensor.detach() if self._detach else tensor
            if reducer is not None:
                with torch.set_grad_enabled(not self._detach and torch.is_grad_enabled()):
                    stored = reducer(stored)
            self._store[key].append(stored.cpu() if self._to_cpu else stored)
            return None

        if site.port == "input":

            def pre_hook(running, args, kwargs):
                if site.key is not None:  # a keyword input: edited or captured only when passed
                    if kwargs.get(site.key) is None:
                        return None
                    new = handle(kwargs[site.key], running)
                    return None if new is None else (args, {**kwargs, site.key: new})
                if args:
                    new = handle(args[0], running)
                    return None if new is None else ((new, *args[1:]), kwargs)
                name = "hidden_states" if "hidden_states" in kwargs else next(
                    (k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None
                )
                if name is None:
                    raise RuntimeError(f"site {key}: the module was called without a tensor input")
                new = handle(kwargs[name], running)
                return None if new is None else (args, {**kwargs, name: new})

            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:

            def post_hook(running, _args, output):
                new = handle(_get(output, site.index), running)
                return None if new is None else _put(output, site.index, new)

            self._handles.append(module.register_forward_hook(post_hook))

    def _attach_whole(self, module: nn.Module, port: str, edit: Callable[[Any], Any]) -> None:
        if port == "input":
            names = [
                p.name for p in inspect.signature(module.forward).parameters.values()
                if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            ]

            def pre_hook(_module, args, kwargs):
                new = edit({**dict(zip(names, args)), **kwargs})
                return None if new is None else ((), new)

            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(lambda _module, _args, output: edit(output)))

    # -- reading -----------------------------------------------------------------------------
    def __getitem__(self, site: str) -> torch.Tensor:
        calls = self.calls(site)
        if not calls:
            raise KeyError(f"nothing captured at {site!r} yet: did the forward pass reach that module?")
        return calls[-1]

    def calls(self, site: str) -> list[torch.Tensor]:
        """Every tensor captured at ``site``, one per forward call, oldest first."""
        key = str(Site.parse(site))
        if key not in self._store:
            raise KeyError(f"{site!r} is not captured; captured sites: {list(self._store)}")
        return self._store[key]

    def __iter__(self):
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Forget captured tensors (the hooks stay attached)."""
        for calls in self._store.values():
            calls.clear()

    # -- lifetime ----------------------------------------------------------------------------
    def remove(self) -> None:
        """Take every hook off the model. Safe to call twice."""
        while self._handles:
            self._handles.pop().remove()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def hook_ids(self) -> set[int]:
        """The ids of the hooks this holds on the model (keys of the modules' hook dicts)."""
        return {handle.id for handle in self._handles}

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def hooks(
    model: nn.Module,
    capture: Iterable[str] | Mapping[str, Reduce | None] = (),
    edit: Mapping[str, Edit] | None = None,
    *,
    to_cpu: bool = False,
    detach: bool = True,
) -> Hooks:
    """Attach hooks; use as ``with hooks(model, capture=[...]) as rec: model(x)``. See ``Hooks``."""
    return Hooks(model, capture, edit, to_cpu=to_cpu, detach=detach)


class _StopForward(Exception):
    """Raised inside a forward pass to end it early; swallowed by ``stop_after``."""


@contextlib.contextmanager
def stop_after(model: nn.Module, module: str) -> Iterator[None]:
    """End forward passes once ``module`` has run, when later layers are not needed.

    ``with hooks(model, capture=[...]) as rec, stop_after(model, "encoder.layer.6"): model(x)``
    """

    def stop(_tensor: torch.Tensor) -> torch.Tensor:
        raise _StopForward

    with Hooks(model, edit={f"{module}:output": stop}):
        try:
            yield
        except _StopForward:
            pass
