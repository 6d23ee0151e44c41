"""`sinkless ppl` and `sinkless stream` on every rotary causal LM family, from a tiny random local folder
(issue 11): the families the sink cache re-rotates stream end to end; the others are refused with one
clear message (exit status 2, no traceback) that says why."""

from __future__ import annotations

import json

import pytest

from conftest import any_tiny_model, tiny_char_tokenizer
from sinkless.cli import main

# (sinks, window) inside each tiny model's sliding window (Gemma2 and gpt-oss: 4 tokens)
STREAMED = {
    "llama": (2, 6), "qwen3": (2, 6), "mistral": (2, 6), "qwen2": (2, 6), "gemma": (2, 6), "phi3": (2, 6),
    "falcon": (2, 6), "gemma2": (1, 3), "gpt_oss": (1, 3),
    "gemma3": (1, 3),  # sliding layers rotate with base 1e4, full layers with 1e6: the cache rotates each layer with its own
}
# why the sink cache refuses a rotary family
REFUSED = {
    "gpt_neox": "partial rotary",  # rotates a quarter of each head
    "qwen3_next": "layer types",  # linear-attention layers (and partial rotary)
}
PROMPT = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w1 w2"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(f"w{i % 10}" for i in range(30)))
    return path


@pytest.mark.parametrize("family", [*STREAMED, *REFUSED])
def test_rotary_family_streams_from_a_local_folder(family, tmp_path, text, capsys):
    folder = tmp_path / "model"
    any_tiny_model(family).save_pretrained(folder)
    tiny_char_tokenizer().save_pretrained(folder)
    sinks, window = STREAMED.get(family, (2, 6))
    out = tmp_path / "ppl.json"
    ppl = main(["-q", "ppl", "--model", str(folder), "--mode", "sink", "--sinks", str(sinks), "--window", str(window),
                "--text", str(text), "--max-tokens", "24", "--no-progress", "--json", str(out)])
    ppl_err = capsys.readouterr().err
    stream = main(["-q", "stream", "--model", str(folder), "--sinks", str(sinks), "--window", str(window),
                   "--prompt", PROMPT, "--max-new-tokens", "5"])
    stream_err = capsys.readouterr().err
    if family in REFUSED:
        for code, err in ((ppl, ppl_err), (stream, stream_err)):
            assert code == 2 and REFUSED[family] in err and "Traceback" not in err, err
            assert "no rotary" not in err, "the rotary embedding is found"
        assert not out.exists()
        return
    assert ppl == 0, ppl_err
    result = json.loads(out.read_text())
    assert result["tokens"] == 24 and result["ppl"] > 1 and len(result["nll_curve"]) == 24
    assert stream == 0, stream_err
    assert f"sinks {sinks} + window {window}" in stream_err
