"""scan.measure on hand-made tensors: massive entries, inputs on the model's device, the hook reducers
(outlier keys, attention columns, learned sinks, output gates), attention shares and query chunking."""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from sinkless.adapters import Modality, TokenLayout
from sinkless.scan.attention import CHUNK_BYTES
from sinkless.scan.measure import ScanSettings, _chunking, _Collector, _head_dim, _massive, _share_of, _shares, model_inputs, to_model


def _nan3(values) -> bool:
    return all(math.isnan(v) for v in values)


# -- massive activations ------------------------------------------------------------------------
def test_massive_of_an_empty_input_is_empty():
    assert _massive(torch.zeros(0, 4), 3, ScanSettings()) == []


def test_massive_entries_pass_both_floors():
    residual = torch.full((3, 4), 0.01)
    residual[1, 2] = -250.0
    residual[2, 0] = 150.0
    assert _massive(residual, 5, ScanSettings()) == [
        {"layer": 5, "token": 1, "channel": 2, "value": -250.0},
        {"layer": 5, "token": 2, "channel": 0, "value": 150.0},
    ]
    assert _massive(residual, 5, ScanSettings(massive_abs=200.0)) == [{"layer": 5, "token": 1, "channel": 2, "value": -250.0}]


# -- inputs on the model -----------------------------------------------------------------------
def test_to_model_moves_tensors_and_casts_only_floating_ones():
    model = torch.nn.Linear(2, 2).to(torch.float64)
    ids, pixels = torch.tensor([[1, 2]]), torch.ones(1, 3, dtype=torch.float32)
    moved = to_model({"input_ids": ids, "pixel_values": pixels, "flag": True}, model)
    assert moved["input_ids"].dtype == torch.int64 and moved["pixel_values"].dtype == torch.float64
    assert moved["flag"] is True
    on_meta = to_model({"input_ids": ids, "pixel_values": pixels}, torch.nn.Linear(2, 2, device="meta"))
    assert on_meta["input_ids"].device.type == "meta" and on_meta["pixel_values"].device.type == "meta"
    assert on_meta["pixel_values"].dtype == torch.float32 and on_meta["input_ids"].dtype == torch.int64
    kwargs = {"input_ids": ids}
    assert to_model(kwargs, torch.nn.Identity()) is kwargs  # no parameters: left as they are


def test_model_inputs_prepares_with_the_settings(monkeypatch):
    seen = {}

    def fake(loaded, batch, *, image_size, max_tokens):
        seen.update(loaded=loaded, batch=batch, image_size=image_size, max_tokens=max_tokens)
        return SimpleNamespace(kwargs={"k": 1}, lengths=[3], image_hw=(7, 9), tokens=[["a"]])

    monkeypatch.setattr(importlib.import_module("sinkless.scan.measure"), "prepare_batch", fake)  # the module, not scan.measure()
    loaded, batch = object(), ["item"]
    assert model_inputs(loaded, batch, ScanSettings(image_size=96, max_tokens=33)) == ({"k": 1}, [3], (7, 9), [["a"]])
    assert seen == {"loaded": loaded, "batch": batch, "image_size": 96, "max_tokens": 33}


# -- hook reducers ----------------------------------------------------------------------------
def _collector(layouts, vision=False, sinks=False, n_layers=2, split=None):
    adapter = SimpleNamespace(sinks=sinks, split_query_gate=split)
    loaded = SimpleNamespace(modality=Modality.VISION if vision else Modality.TEXT, adapter=adapter)
    return _Collector(loaded, ScanSettings(), layouts, n_layers)


def test_block_input_keys_leave_out_the_text_sink():
    layouts = lambda n: [TokenLayout(n), TokenLayout(n, 1)]  # noqa: E731
    hidden = torch.ones(2, 6, 3)
    hidden[:, 0] = 50.0  # the first token (the sink) of text
    hidden[:, 4] = 20.0
    c = _collector(layouts)
    c.block_input(0)(hidden)
    assert c.keys[0].tolist() == [[False, False, False, False, True, False]] * 2
    v = _collector(lambda n: [TokenLayout(n, 1), TokenLayout(n, 0, 0, (2, 3))], vision=True)
    v.block_input(0)(hidden)
    assert v.keys[0].tolist() == [[False, False, False, False, True, False], [True, False, False, False, True, False]]


def _probs(b, h, c, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, c, k, generator=g).softmax(-1)


def test_text_attention_columns_of_the_first_token_per_chunk():
    # input 0: first token 1 (one register), input 1: first token 2 (two registers); 4 tokens, H = 2
    layouts = lambda n: [TokenLayout(n, 0, 1), TokenLayout(n, 0, 2)]  # noqa: E731
    c = _collector(layouts)
    c.keys[0] = torch.tensor([[False, False, False, True], [False, True, False, False]])
    absorb, reduce = c.attention(0)
    first = _probs(2, 2, 2, 2, seed=1)  # queries 0..1 see keys 0..1: input 1's first token is unseen
    absorb(first, 0)
    second = _probs(2, 2, 2, 4, seed=2)  # queries 2..3 see every key
    absorb(second, 2)
    col = c.first_col[0]
    assert col.shape == (2, 2, 4)
    assert torch.equal(col[0, :, :2], first[0, :, :, 1]) and torch.equal(col[0, :, 2:], second[0, :, :, 1])
    assert torch.equal(col[1, :, :2], torch.zeros(2, 2)) and torch.equal(col[1, :, 2:], second[1, :, :, 2])
    keys = c.keys[0].float()
    assert torch.allclose(c.mass[0][:, :2], torch.einsum("bhqk,bk->bq", first, keys[:, :2]) / 2)
    assert torch.allclose(c.mass[0][:, 2:], torch.einsum("bhqk,bk->bq", second, keys) / 2)
    assert c.cls_row is None and c.sink == {}


def test_text_attention_of_three_queries_at_a_time():
    layouts = lambda n: [TokenLayout(n), TokenLayout(n, 0, 1)]  # noqa: E731
    c = _collector(layouts)
    c.keys[1] = torch.zeros(2, 3, dtype=torch.bool)
    _, reduce = c.attention(1)
    probs = _probs(2, 2, 3, 3)
    assert reduce(probs) is None
    assert torch.equal(c.first_col[1][0], probs[0, :, :, 0]) and torch.equal(c.first_col[1][1], probs[1, :, :, 1])
    assert torch.equal(c.mass[1], torch.zeros(2, 3))


def test_learned_sink_share_is_what_rows_leave_out():
    c = _collector(lambda n: [TokenLayout(n), TokenLayout(n)], sinks=True)
    c.keys[0] = torch.zeros(2, 3, dtype=torch.bool)
    absorb, _ = c.attention(0)
    probs = torch.zeros(2, 2, 2, 3)
    probs[..., 0] = torch.tensor([[[0.9, 0.8], [0.7, 0.6]], [[0.5, 0.4], [0.3, 0.2]]])  # (B, H, c)
    absorb(probs, 1)  # queries 1..2
    expected = torch.tensor([[0.0, 0.2, 0.3], [0.0, 0.6, 0.7]])  # 1 - row sum, mean over heads
    assert torch.allclose(c.sink[0], expected)


def test_vision_keeps_the_cls_row_of_the_last_layer_only():
    c = _collector(lambda n: [TokenLayout(n, 1), TokenLayout(n, 1)], vision=True, n_layers=2)
    for layer in (0, 1):
        c.keys[layer] = torch.zeros(2, 3, dtype=torch.bool)
    _, reduce0 = c.attention(0)
    reduce0(_probs(2, 2, 3, 3, seed=3))
    assert c.cls_row is None and c.first_col == {}
    _, reduce1 = c.attention(1)
    probs = _probs(2, 2, 3, 3, seed=4)
    reduce1(probs)
    assert torch.allclose(c.cls_row, probs[:, :, 0, :].mean(1))


def test_query_gate_is_the_mean_sigmoid_of_each_input_s_tokens():
    def split(query, head_dim):
        b, n, _ = query.shape
        q, g = query.view(b, n, -1, 2 * head_dim).chunk(2, dim=-1)
        return q.reshape(b, n, -1), g.reshape(b, n, -1)

    layouts = lambda n: [TokenLayout(n), TokenLayout(n - 1)]  # noqa: E731  input 1: one padded token
    c = _collector(layouts, split=split)
    query = torch.zeros(2, 3, 4)  # H = 1, d = 2: [q, q, gate, gate]
    query[0, :, 2:] = torch.tensor([[0.0, 0.0], [2.0, 2.0], [-2.0, -2.0]])
    query[1, :, 2:] = torch.tensor([[1.0, 1.0], [1.0, 1.0], [9.0, 9.0]])
    query[:, :, :2] = 7.0  # queries are not the gate
    assert c.query_gate(1, 2)(query) is None
    assert torch.allclose(c.gate[1], torch.tensor([0.5, torch.sigmoid(torch.tensor(1.0)).item()]))


# -- shares, chunking, head size ----------------------------------------------------------------
def test_share_of_and_shares_on_a_hand_made_matrix():
    layout = TokenLayout(5, 1, 0, None, 1)  # CLS, 3 body tokens, 1 appended
    body = torch.tensor([False, True, True, True, False])
    keys = torch.tensor([False, False, True, False, False])
    attn = torch.tensor([
        [0.2, 0.1, 0.6, 0.1, 0.0],
        [0.1, 0.5, 0.2, 0.2, 0.0],
        [0.0, 0.0, 1.0, 0.0, 0.0],
        [0.3, 0.3, 0.4, 0.0, 0.0],
        [0.1, 0.1, 0.7, 0.1, 0.0],
    ])
    cls, on_body, on_all = _shares(attn, keys, layout, body)
    assert cls == pytest.approx(0.6) and on_body == pytest.approx(0.3)  # body queries 1 and 3 (not the key itself)
    assert on_all == pytest.approx((0.6 + 0.2 + 0.4) / 3)  # CLS, 1, 3: not the key, not the appended token
    assert _nan3(_shares(attn, torch.zeros(5, dtype=torch.bool), layout, body))
    text = _share_of(torch.tensor([0.5, 0.1, 0.9]), torch.tensor([False, False, True]), TokenLayout(3), torch.tensor([False, True, True]))
    assert math.isnan(text[0]) and text[1] == pytest.approx(0.1) and text[2] == pytest.approx(0.3)


def test_chunking_when_asked_never_with_none_by_default_past_the_budget():
    cfg = lambda **kw: SimpleNamespace(config=SimpleNamespace(**kw))  # noqa: E731
    one = {"input_ids": torch.zeros(1, 4096, dtype=torch.long)}  # 4 bytes x 1 x 1 x 4096^2 = CHUNK_BYTES exactly
    assert CHUNK_BYTES == 4 * 4096 * 4096
    assert _chunking(1, one, torch.nn.Identity()) is True and _chunking(3, one, torch.nn.Identity()) is True
    assert _chunking(None, one, cfg(num_attention_heads=8)) is False
    assert _chunking(0, one, cfg(num_attention_heads=1)) is False  # at the budget: not past it
    assert _chunking(0, one, cfg(num_attention_heads=2)) is True
    assert _chunking(0, one, torch.nn.Identity()) is False  # no config: one head
    assert _chunking(0, one, cfg()) is False and _chunking(0, one, cfg(num_attention_heads=None)) is False
    two = {"input_ids": torch.zeros(2, 4096, dtype=torch.long)}
    assert _chunking(0, two, cfg(num_attention_heads=1)) is True
    small = {"input_ids": torch.zeros(4, 1024, dtype=torch.long)}  # 4 x 4 x 4 x 1024^2 = CHUNK_BYTES
    assert _chunking(0, small, cfg(num_attention_heads=4)) is False
    assert _chunking(0, small, cfg(num_attention_heads=5)) is True
    # 4 x 3 x 1 x 2400^2 = 69 120 000 > 2^26 = 67 108 864 > ... 4 x 3 x 2364^2 = 67 062 528: the factor 4 counts
    assert _chunking(0, {"input_ids": torch.zeros(3, 2364, dtype=torch.long)}, cfg(num_attention_heads=1)) is False
    assert _chunking(0, {"input_ids": torch.zeros(3, 2400, dtype=torch.long)}, cfg(num_attention_heads=1)) is True


def test_head_dim_from_the_module_the_config_or_the_width():
    config = SimpleNamespace(hidden_size=32, num_attention_heads=4, head_dim=16)
    model = SimpleNamespace(config=config)
    assert _head_dim(SimpleNamespace(head_dim=6), model) == 6
    assert _head_dim(SimpleNamespace(head_dim=6), SimpleNamespace()) == 6  # a model without a config
    assert _head_dim(SimpleNamespace(), model) == 16
    assert _head_dim(SimpleNamespace(head_dim=None), SimpleNamespace(config=SimpleNamespace(hidden_size=32, num_attention_heads=4))) == 8
    assert _head_dim(SimpleNamespace(), SimpleNamespace(config=SimpleNamespace(hidden_size=32, num_attention_heads=4, head_dim=None))) == 8
