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


def test_whole_call_sites():
    """``:input[*]`` edits every input of a call at once (positional ones by name); ``:output[*]`` the whole
    output. Identity edits are a no-op; the model is left as it was."""
    model = tiny_model("llama")
    ids = tiny_inputs(model)["input_ids"]
    plain = model(ids).logits
    seen = {}

    def inputs(kwargs):
        seen.update(kwargs)
        return {**kwargs, "input_ids": kwargs["input_ids"].flip(1)}

    def output(out):
        out.logits = out.logits * 0
        return out

    with hooks(model, edit={":input[*]": lambda kwargs: None, ":output[*]": lambda out: None}):
        same = model(ids).logits
    print(f"identity whole-call edits: max |diff| = {(same - plain).abs().max().item():.3g}")
    assert torch.equal(same, plain)
    with hooks(model, edit={":input[*]": inputs}):
        flipped = model(ids, use_cache=False).logits
    assert torch.equal(seen["input_ids"], ids) and seen["use_cache"] is False
    assert torch.allclose(flipped, model(ids.flip(1)).logits)
    with hooks(model, edit={":output[*]": output}):
        assert not model(ids).logits.any()
    assert not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(ValueError, match="edited, not captured"):
        hooks(model, capture=[":input[*]"])
