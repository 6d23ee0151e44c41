"""StreamingLLM on the real SmolLM2-135M (slow: a few seconds each)."""

from __future__ import annotations

import json

import pytest
import torch

from sinkless.streaming import SinkCache, streaming_forward
from sinkless.streaming.text import read_text, tokenize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hamlet_ids(smollm2):
    return tokenize(smollm2.tokenizer, read_text(), max_tokens=400)


def test_chunked_prefill_is_exact_on_smollm2(smollm2, hamlet_ids):
    model, ids = smollm2.model, hamlet_ids[None, :40]
    logits = {}
    with torch.no_grad():
        for chunk in (5, 40):
            cache = SinkCache(model, sinks=4, window=12)
            logits[chunk] = torch.cat([streaming_forward(model, cache, ids[:, i : i + chunk]).logits for i in range(0, 40, chunk)], 1)
            assert cache.get_seq_length() == 4 + 12 - 1
    diff = (logits[5] - logits[40]).abs().max().item()
    print(f"SmolLM2 chunk 5 vs one 40-token prefill (S=4, W=12): max |diff| = {diff:.3g}")
    assert diff < 2e-3


def test_sinks_rescue_the_window_on_smollm2(smollm2, hamlet_ids):
    """Window-only attention collapses once the first token is evicted; four sinks bring it back."""
    from sinkless.streaming.ppl import PplConfig, perplexity

    tokens = hamlet_ids[:201]
    run = {
        mode: perplexity(smollm2.model, tokens, PplConfig(mode=mode, window=32, chunk_size=100), progress=False).ppl
        for mode in ("window", "sink")
    }
    print(f"SmolLM2, 200 tokens of Hamlet, W=32: {run}")
    assert run["window"] > 2 * run["sink"]


def test_ppl_cli_writes_json_and_plot(smollm2, tmp_path, capsys):
    from sinkless.cli import main

    out, png = tmp_path / "sink.json", tmp_path / "ppl.png"
    argv = ["ppl", "--model", "smollm2-135m", "--mode", "sink", "--sinks", "4", "--window", "16", "--max-tokens", "48"]
    assert main([*argv, "--json", str(out), "--plot", str(png), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    for key in ("model", "mode", "sinks", "window", "tokens", "ppl", "tokens_per_second", "peak_rss_mb", "nll_curve", "sinkless_version"):
        assert key in data, key
    assert (data["model"], data["mode"], data["sinks"], data["window"], data["tokens"]) == ("smollm2-135m", "sink", 4, 16, 48)
    assert len(data["nll_curve"]) == 48 and 1 < data["ppl"] < 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert "ppl" in capsys.readouterr().out


def test_stream_cli_generates_past_the_window(smollm2, capsys):
    from sinkless.cli import main

    argv = ["stream", "--model", "smollm2-135m", "--sinks", "2", "--window", "8", "--max-new-tokens", "6"]
    assert main([*argv, "--prompt", "Once upon a time, in a small village by the sea, there lived"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip(), "nothing generated"
    assert "cache holds 9 of" in captured.err


def test_chat_keeps_one_cache_across_turns(smollm2):
    from sinkless.streaming.generate import Chat, Sampling

    chat = Chat(smollm2.model, smollm2.tokenizer, sinks=4, window=24)
    replies = ["".join(chat.send(turn, Sampling(max_new_tokens=4))) for turn in ("Hi!", "What is 2+2?")]
    print("replies:", replies)
    assert all(r.strip() for r in replies)
    assert [m["role"] for m in chat.messages][-4:] == ["user", "assistant", "user", "assistant"]
    assert chat.cache.seen > 4 + 24 and chat.cache.get_seq_length() == 4 + 24 - 1  # the template alone fills the window
    assert chat._fed and chat._render(chat.messages[:-1]).startswith(chat._fed[: len(chat._fed) // 2])
