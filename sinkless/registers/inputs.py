"""Discovery and held-out inputs for register-neuron discovery: the user's, or bundled ones that never overlap."""

from __future__ import annotations

from collections.abc import Sequence

from sinkless.adapters import Modality
from sinkless.errors import SinklessError
from sinkless.images import natural_crops
from sinkless.scan.inputs import ImageInput, TextInput, resolve_inputs
from sinkless.zoo import Loaded

__all__ = ["discovery_inputs", "split_heldout", "text_passages"]


def text_passages(n: int, *, start: int = 0, words: int = 80) -> list[TextInput]:
    """``n`` passages of about ``words`` words from the bundled Hamlet, from passage ``start`` on."""
    from sinkless.streaming.text import read_text

    tokens = read_text().split()
    passages = []
    for i in range(start, start + n):
        chunk = tokens[i * words : (i + 1) * words]
        if not chunk:
            raise SinklessError(f"the bundled text holds fewer than {start + n} passages of {words} words")
        passages.append(TextInput(f"hamlet[{i * words}:{(i + 1) * words}]", " ".join(chunk)))
    return passages


def split_heldout(items: Sequence) -> tuple[list, list]:
    """(discovery, held-out) of the user's inputs: every 4th is held out (the last one when there are fewer than 4)."""
    heldout = list(items[3::4]) or list(items[-1:])
    return [item for item in items if item not in heldout], heldout


def discovery_inputs(
    loaded: Loaded, inputs: Sequence[str], texts: Sequence[str], n_inputs: int, n_heldout: int
) -> tuple[list, list]:
    """(discovery, held-out): every 4th user input is held out; bundled ones come from disjoint sources."""
    if inputs or texts:
        items = resolve_inputs(inputs, texts, loaded.modality)
        if len(items) < 2:
            raise SinklessError("need at least 2 inputs (one is held out to check the fix)", fix="pass more files")
        return split_heldout(items)
    if loaded.modality is Modality.VISION:
        return (
            [ImageInput(f"crop{i}", im) for i, im in enumerate(natural_crops(n_inputs, seed=0))],
            [ImageInput(f"heldout{i}", im) for i, im in enumerate(natural_crops(n_heldout, seed=1))],
        )
    return text_passages(n_inputs), text_passages(n_heldout, start=n_inputs)
