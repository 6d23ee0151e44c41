"""sinkless: find and repair attention sinks, massive activations and high-norm artifact tokens.

The public API works on model objects::

    import sinkless
    report = sinkless.scan(model, images_or_texts, processor)          # a Report (report.to_dict() is report.json)
    neurons = sinkless.find_register_neurons(model, images_or_texts)   # Jiang et al. 2025
    with sinkless.TestTimeRegisters(model, neurons):                   # or handle = ....attach(); handle.remove()
        outputs = model(**batch)
    loaded = sinkless.load("smollm2-135m")                             # zoo name, hub id or folder
    cache = sinkless.SinkCache(model, sinks=4, window=1020)            # StreamingLLM

``sinkless.scan`` is also the subpackage (``from sinkless.scan import ScanSettings``): its module
object is callable. Names are imported on first use, so ``import sinkless`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from sinkless._version import __version__

__all__ = [
    "__version__",
    "load",
    "scan",
    "find_register_neurons",
    "TestTimeRegisters",
    "RegisterNeurons",
    "load_neurons",
    "SinkCache",
    "Report",
    "ScanSettings",
    "SinklessError",
]

_WHERE = {
    "load": "sinkless.api",
    "find_register_neurons": "sinkless.api",
    "TestTimeRegisters": "sinkless.registers.ttr",
    "RegisterNeurons": "sinkless.registers.ttr",
    "load_neurons": "sinkless.registers.ttr",
    "SinkCache": "sinkless.streaming",
    "Report": "sinkless.scan.report",
    "ScanSettings": "sinkless.scan.measure",
    "SinklessError": "sinkless.errors",
}

if TYPE_CHECKING:  # for readers and type checkers; at run time the names load lazily
    from sinkless.api import find_register_neurons, load
    from sinkless.errors import SinklessError
    from sinkless.registers.ttr import RegisterNeurons, TestTimeRegisters, load_neurons
    from sinkless.scan.measure import ScanSettings
    from sinkless.scan.report import Report
    from sinkless.streaming import SinkCache


def __getattr__(name: str):
    if name == "scan":  # the subpackage, whose module object is the callable sinkless.api.scan
        return importlib.import_module("sinkless.scan")
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sinkless' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
