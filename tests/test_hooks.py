"""The hook primitive: captures, edits, and leaves the model exactly as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_inputs, tiny_model
from sinkless.adapters import adapter_for, eager_attention
from sinkless.hooks import Site, hooks


def _handles(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def test_site_parsing():
    assert Site.parse("a.b:input") == Site("a.b", "input", None)
    assert Site.parse("a.0:output[1]") == Site("a.0", "output", 1)
    assert str(Site.parse("a.0:output[1]")) == "a.0:output[1]"
    with pytest.raises(ValueError, match="bad hook site"):
        Site.parse("a.b")
    with pytest.raises(ValueError, match="bad hook site"):
        Site.parse("a.b:middle")


def test_unknown_module_names_children():
    model = tiny_model("dinov2")
    with pytest.raises(ValueError, match="children of 'encoder'"):
        hooks(model, capture=["encoder.nope:output"])
    assert _handles(model) == 0


def test_a_failing_later_site_removes_the_hooks_already_attached():
    """Hooks(...) attaches site by site: when a later one fails, the earlier ones come off again."""
    model = tiny_model("dinov2")
    adapter = adapter_for(model)
    good = [adapter.residual_site(0), adapter.mlp_hidden_site(1)]
    with pytest.raises(ValueError, match="no module"):
        hooks(model, capture=[*good, "encoder.layer.9:output"])
    assert _handles(model) == 0
    with pytest.raises(ValueError, match="no module"):  # edits are attached first, captures after
        hooks(model, capture=["encoder.nope:output"], edit={adapter.residual_site(1): lambda t: t})
    assert _handles(model) == 0
    with pytest.raises(ValueError, match="bad hook site"):
        hooks(model, capture=good, edit={adapter.residual_site(1): lambda t: t, "encoder:middle": lambda t: t})
    assert _handles(model) == 0
    plain = _outputs(model, tiny_inputs(model))
    with hooks(model, capture=good) as rec:  # and the model still works with hooks
        assert _handles(model) == 2
        _outputs(model, tiny_inputs(model))
    assert set(rec) == set(good) and len(rec) == 2
    assert torch.equal(_outputs(model, tiny_inputs(model)), plain)


def test_capture_every_adapter_site_and_clean_exit(family):
    """Residual, MLP hidden and attention sites resolve on every family; nothing is left behind."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    inputs = tiny_inputs(model)
    before_state, before_out = _state(model), _outputs(model, inputs)
    impl = model.config._attn_implementation
    n = adapter.num_layers(model)
    sites = [adapter.residual_site(i) for i in range(n)] + [adapter.mlp_hidden_site(i) for i in range(n)]
    sites += [adapter.attention_site(i) for i in range(n)]
    with eager_attention(model), torch.no_grad(), hooks(model, capture=sites) as rec:
        model(**inputs)
    width = adapter.mlp_width(model)
    for i in range(n):
        residual, hidden, attn = rec[adapter.residual_site(i)], rec[adapter.mlp_hidden_site(i)], rec[adapter.attention_site(i)]
        assert residual.shape[:2] == hidden.shape[:2]
        assert hidden.shape[-1] == width
        assert attn.shape[-1] == attn.shape[-2] == residual.shape[1]
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)), atol=1e-4, rtol=0)
    assert _handles(model) == 0
    assert model.config._attn_implementation == impl
    after_out = _outputs(model, inputs)
    diff = (after_out - before_out).abs().max().item()
    assert diff == 0, f"outputs changed after the context: max diff {diff}"
    for k, v in _state(model).items():
        assert torch.equal(v, before_state[k]), k


def test_identity_edit_is_a_no_op(family):
    """Editing every residual and MLP site with the identity leaves outputs identical."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    inputs = tiny_inputs(model)
    plain = _outputs(model, inputs)
    n = adapter.num_layers(model)
    edits = {adapter.residual_site(i): (lambda t: t) for i in range(n)}
    edits.update({adapter.mlp_hidden_site(i): (lambda t: t.clone()) for i in range(n)})
    with hooks(model, edit=edits):
        edited = _outputs(model, inputs)
    diff = (edited - plain).abs().max().item()
    assert diff == 0, f"identity edits changed the outputs: max diff {diff}"
    assert _handles(model) == 0


def test_edit_changes_output_and_capture_sees_edit():
    model = tiny_model("dinov2")
    adapter = adapter_for(model)
    inputs = tiny_inputs(model)
    plain = _outputs(model, inputs)
    site = adapter.mlp_hidden_site(1)
    with hooks(model, capture=[site], edit={site: lambda t: torch.zeros_like(t)}) as rec:
        edited = _outputs(model, inputs)
    assert torch.count_nonzero(rec[site]) == 0
    assert (edited - plain).abs().max() > 1e-4
    assert torch.equal(_outputs(model, inputs), plain)


def test_hooks_removed_when_forward_raises():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    inputs = tiny_inputs(model)
    plain = _outputs(model, inputs)

    def boom(t):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with hooks(model, capture=[adapter.residual_site(0)], edit={adapter.mlp_hidden_site(1): boom}):
            model(**inputs)
    assert _handles(model) == 0
    assert torch.equal(_outputs(model, inputs), plain)


def test_eager_attention_restored_on_exception():
    model = tiny_model("clip_vision")
    impl = model.config._attn_implementation
    with pytest.raises(ValueError):
        with eager_attention(model):
            assert model.config._attn_implementation == "eager"
            raise ValueError
    assert model.config._attn_implementation == impl
    assert all(m.config._attn_implementation == impl for m in model.modules() if hasattr(m, "config"))


def test_persistent_handle_and_calls():
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    inputs = tiny_inputs(model)
    handle = hooks(model, capture={adapter.residual_site(0): lambda t: t.norm(dim=-1)}, to_cpu=True)
    assert handle.attached
    with torch.no_grad():
        model(**inputs)
        model(**inputs)
    calls = handle.calls(adapter.residual_site(0))
    assert len(calls) == 2 and calls[0].shape == (2, 7)
    handle.remove()
    handle.remove()  # idempotent
    assert _handles(model) == 0
    with pytest.raises(KeyError, match="not captured"):
        handle.calls("transformer.h.1:output")


def test_attention_site_without_eager_is_a_clear_error():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    adapter = adapter_for(model)
    with pytest.raises(ValueError, match="eager attention"):
        with hooks(model, capture=[adapter.attention_site(0)]):
            model(**tiny_inputs(model))
    assert _handles(model) == 0


def test_keyword_input_site():
    model = tiny_model("llama")
    ids = torch.randint(1, 64, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    seen = []

    def record(t):
        seen.append(t.clone())
        return t

    with hooks(model, edit={"model:input[attention_mask]": record}):
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids)  # not passed: the edit is skipped
    assert len(seen) == 1 and torch.equal(seen[0], mask)
    assert str(Site.parse("model:input[attention_mask]")) == "model:input[attention_mask]"
    with pytest.raises(ValueError, match="keyword inputs"):
        Site.parse("model:output[attention_mask]")
    with pytest.raises(ValueError, match="only for outputs"):
        Site.parse("model:input[0]")


class _Outputs(nn.Module):
    """A module returning a tensor, a tuple, a list or a dict-like output of three tensors."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x, *, scale=None):
        parts = [x, x + 1, x + 2]
        if scale is not None:
            parts = [p * scale for p in parts]
        if self.kind == "tensor":
            return x * 1
        if self.kind == "tuple":
            return tuple(parts)
        if self.kind == "list":
            return parts
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=parts[0], hidden_states=parts[1], attentions=parts[2])


class _Wrap(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inner = _Outputs(kind)

    def forward(self, x, **kw):
        return self.inner(x, **kw)


@pytest.mark.parametrize("kind", ["tuple", "list", "model_output"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_edit_replaces_exactly_one_element_of_an_output(kind, index):
    model = _Wrap(kind)
    x = torch.zeros(2, 3)
    with hooks(model, capture=[f"inner:output[{index}]"], edit={f"inner:output[{index}]": lambda t: t * 0 - 5}) as rec:
        out = model(x)
    values = [out[i] for i in range(3)]
    assert len(out) == 3 and type(out).__name__ == type(_Outputs(kind)(x)).__name__
    for i in range(3):
        expected = torch.full((2, 3), -5.0) if i == index else x + i
        assert torch.equal(values[i], expected), (kind, index, i)
    assert torch.equal(rec[f"inner:output[{index}]"], torch.full((2, 3), -5.0))
    assert _handles(model) == 0


def test_output_sites_of_a_single_tensor():
    model = _Wrap("tensor")
    x = torch.ones(1, 2)
    with hooks(model, capture=["inner:output", "inner:output[0]"]) as rec:
        model(x)
    assert torch.equal(rec["inner:output"], x) and torch.equal(rec["inner:output[0]"], x)
    with pytest.raises(ValueError, match="element 1 of an output that is a single tensor"):
        with hooks(model, capture=["inner:output[1]"]):
            model(x)


def test_input_sites_positional_keyword_and_named():
    model = _Wrap("tuple")
    x = torch.ones(1, 2)
    with hooks(model, capture=["inner:input", "inner:input[scale]"], edit={"inner:input": lambda t: t * 3}) as rec:
        out = model(x, scale=torch.tensor(2.0))
        model(x)  # no scale passed: nothing captured at that site for this call
    assert torch.equal(out[0], torch.full((1, 2), 6.0))
    assert torch.equal(rec["inner:input"], torch.full((1, 2), 3.0))  # captures see the edit
    assert len(rec.calls("inner:input")) == 2 and len(rec.calls("inner:input[scale]")) == 1
    with hooks(model, edit={"inner:input[scale]": lambda t: t + 1}):
        assert torch.equal(model(x, scale=torch.tensor(2.0))[0], torch.full((1, 2), 3.0))


def test_tensor_passed_as_keyword_is_the_input():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Identity()

        def forward(self, x):
            return self.inner(input=x)

    model = Keyword()
    with hooks(model, capture=["inner:input"], edit={"inner:input": lambda t: t + 1}) as rec:
        out = model(torch.zeros(3))
    assert torch.equal(out, torch.ones(3)) and torch.equal(rec["inner:input"], torch.ones(3))

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _Kw()

        def forward(self, x):
            return self.inner(mask=x * 0, hidden_states=x)

    model = Hidden()
    with hooks(model, capture=["inner:input"]) as rec:
        model(torch.full((2,), 4.0))
    assert torch.equal(rec["inner:input"], torch.full((2,), 4.0))  # hidden_states, not the first tensor keyword


class _Kw(nn.Module):
    def forward(self, mask=None, hidden_states=None):
        return hidden_states


def test_captures_are_detached_reduced_and_kept_on_their_device():
    model = nn.Sequential(nn.Linear(2, 2))
    x = torch.ones(1, 2, requires_grad=True)
    with hooks(model, capture={"0:output": None}) as rec:
        model(x)
    assert rec["0:output"].requires_grad is False
    with hooks(model, capture={"0:output": lambda t: t.sum(-1)}, detach=False) as rec:
        model(x)
    assert rec["0:output"].requires_grad and rec["0:output"].shape == (1,)
    meta = nn.Sequential(nn.Linear(2, 2, device="meta"))
    with hooks(meta, capture=["0:output"]) as rec:  # to_cpu=False: stays where the model computed it
        meta(torch.ones(1, 2, device="meta"))
    assert rec["0:output"].device.type == "meta"
    with hooks(model, capture=["0:output"], to_cpu=True) as rec:
        model(x)
    assert rec["0:output"].device.type == "cpu"


def test_reading_before_a_forward_and_clearing():
    model = nn.Sequential(nn.Linear(2, 2))
    with hooks(model, capture=["0:output"]) as rec:
        with pytest.raises(KeyError, match="nothing captured"):
            rec["0:output"]
        model(torch.ones(1, 2))
        assert len(rec.calls("0:output")) == 1
        rec.clear()
        assert rec.calls("0:output") == [] and rec.attached
    assert not rec.attached


def test_unknown_module_message_names_the_nearest_children():
    model = _Wrap("tuple")
    with pytest.raises(ValueError) as error:
        hooks(model, capture=["inner.deep:output"])
    assert str(error.value) == "_Wrap has no module 'inner.deep'; children of 'inner': []"
    with pytest.raises(ValueError) as error:
        hooks(model, capture=["nothing.here.at_all:output"])
    assert str(error.value) == "_Wrap has no module 'nothing.here.at_all'; children of 'nothing.here': ['inner']"
    with pytest.raises(ValueError) as error:
        hooks(model, capture=["missing:output"])
    assert str(error.value) == "_Wrap has no module 'missing'; children of '<root>': ['inner']"


def test_site_strings_round_trip():
    for spec in ("a.b:input", "a:output", "a.0:output[2]", "m:input[mask]", ":input", ":output"):
        assert str(Site.parse(spec)) == spec
    assert Site.parse(Site("a", "output", 1)) == Site("a", "output", 1)
    assert Site.parse("a:output[12]").index == 12 and Site.parse("m:input[attention_mask]").key == "attention_mask"
    for bad in ("a:output[]", "a:output[-1]", "a b:input", "a:input[1x]", "a:output[0][1]"):
        with pytest.raises(ValueError, match="bad hook site"):
            Site.parse(bad)


def test_stop_after_ends_the_forward_and_keeps_captures():
    from sinkless.hooks import stop_after

    model = tiny_model("dinov2")
    adapter = adapter_for(model)
    seen = []
    with hooks(model, capture=[adapter.residual_site(0), adapter.residual_site(2)]) as rec, stop_after(model, adapter.block(0)):
        seen.append(model(**tiny_inputs(model)))
    assert seen == [] and len(rec.calls(adapter.residual_site(0))) == 1
    assert rec.calls(adapter.residual_site(2)) == []  # later blocks never ran
    assert _handles(model) == 0


def test_hooks_class_defaults_detach_and_keep_the_device():
    from sinkless.hooks import Hooks

    model = nn.Sequential(nn.Linear(2, 2))
    with Hooks(model, capture=["0:output"]) as rec:
        model(torch.ones(1, 2, requires_grad=True))
    assert rec["0:output"].requires_grad is False
    meta = nn.Sequential(nn.Linear(2, 2, device="meta"))
    with Hooks(meta, capture=["0:output"]) as rec:
        meta(torch.ones(1, 2, device="meta"))
    assert rec["0:output"].device.type == "meta"
    # to_cpu=True really copies to the CPU: a meta tensor, having no data, cannot be
    for attach in (lambda: hooks(meta, capture=["0:output"], to_cpu=True), lambda: Hooks(meta, capture=["0:output"], to_cpu=True)):
        with attach(), pytest.raises(NotImplementedError):  # one at a time
            meta(torch.ones(1, 2, device="meta"))
        assert _handles(meta) == 0


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Add()

    def forward(self, a, b, c=None):
        return self.inner(a, b) if c is None else self.inner(a=a, b=b, c=c)


class _Add(nn.Module):
    def forward(self, a=None, b=None, c=None):
        return a + b if c is None else c


def test_editing_the_first_input_keeps_the_others():
    model = _TwoInputs()
    with hooks(model, edit={"inner:input": lambda t: t * 10}):
        out = model(torch.ones(2), torch.full((2,), 3.0))
    assert out.tolist() == [13.0, 13.0]


def test_input_site_of_a_call_without_tensors_is_a_clear_error():
    class NoTensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Identity()

        def forward(self, x):
            self.inner(input="text")
            return x

    model = NoTensor()
    with pytest.raises(RuntimeError) as error, hooks(model, capture=["inner:input"]):
        model(torch.ones(1))
    assert str(error.value) == "site inner:input: the module was called without a tensor input"


def test_messages_of_bad_sites_and_non_tensor_outputs():
    with pytest.raises(ValueError) as error:
        Site.parse("a.b")
    assert str(error.value) == (
        "bad hook site 'a.b': expected '<module path>:input', '<module path>:output' "
        "'<module path>:output[i]' or '<module path>:input[keyword]', e.g. 'encoder.layer.3.mlp.fc2:input'"
    )

    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _Pair()

        def forward(self, x):
            return self.inner(x)

    model = Partial()
    with pytest.raises(ValueError) as error, hooks(model, capture=["inner:output[1]"]):
        model(torch.ones(1))
    assert str(error.value) == (
        "element 1 of this output is NoneType, not a tensor"
        " (attention probabilities are None unless eager attention is on: see adapters.eager_attention)"
    )
    with pytest.raises(ValueError, match="element 2 of this output is str"), hooks(model, capture=["inner:output[2]"]):
        model(torch.ones(1))


class _Pair(nn.Module):
    def forward(self, x):
        return x, None, "label"


def test_the_first_element_of_a_tuple_output_is_the_default():
    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _NoneFirst()

        def forward(self, x):
            return self.inner(x)

    model = First()
    with pytest.raises(ValueError, match="^element 0 of this output is NoneType"), hooks(model, capture=["inner:output"]):
        model(torch.ones(1))


class _NoneFirst(nn.Module):
    def forward(self, x):
        return None, x
