"""StreamingLLM on the real SmolLM2-135M (slow: a few seconds each): exact chunked prefill, the CLI verbs,
multi-turn chat through model.generate, transformers' streamers, Ctrl-C."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from sinkless.streaming import SinkCache
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
            logits[chunk] = torch.cat([model(ids[:, i : i + chunk], past_key_values=cache).logits for i in range(0, 40, chunk)], 1)
            assert cache.kept() == [4 + 12]
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
    argv = ["ppl", "--model", "smollm2-135m", "--mode", "sink", "--sinks", "4", "--window", "16", "--max-tokens", "48", "--device", "cpu"]
    assert main([*argv, "--json", str(out), "--plot", str(png), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    for key in ("model", "mode", "sinks", "window", "tokens", "ppl", "tokens_per_second", "peak_rss_mb", "nll_curve", "sinkless_version", "device", "dtype"):
        assert key in data, key
    assert (data["model"], data["mode"], data["sinks"], data["window"], data["tokens"]) == ("smollm2-135m", "sink", 4, 16, 48)
    assert (data["device"], data["dtype"]) == ("cpu", "float32")
    assert len(data["nll_curve"]) == 48 and 1 < data["ppl"] < 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert "ppl" in capsys.readouterr().out


def test_stream_cli_generates_past_the_window(smollm2, capsys):
    from sinkless.cli import main

    argv = ["stream", "--model", "smollm2-135m", "--sinks", "2", "--window", "8", "--max-new-tokens", "6", "--repetition-penalty", "1.2"]
    assert main([*argv, "--prompt", "Once upon a time, in a small village by the sea, there lived"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip(), "nothing generated"
    assert "cache holds 10 of" in captured.err


def test_chat_keeps_one_cache_across_turns(smollm2):
    from sinkless.streaming import Chat

    chat = Chat(smollm2.model, smollm2.tokenizer, sinks=4, window=24)
    replies = [chat.send(turn, max_new_tokens=4).text for turn in ("Hi!", "What is 2+2?")]
    print("replies:", replies)
    assert all(r.strip() for r in replies)
    assert [m["role"] for m in chat.messages][-4:] == ["user", "assistant", "user", "assistant"]
    assert chat.cache.seen()[0] > 4 + 24 and chat.cache.kept() == [4 + 24]  # the template alone fills the window
    assert chat.cache.seen() == [chat.ids.shape[1] - 1]  # everything but the last reply token went through the cache


def test_text_iterator_streamer(smollm2):
    """Output streams through transformers' own streamers (here from a generation thread)."""
    from transformers import TextIteratorStreamer

    from sinkless.streaming import complete

    # a timeout: a generation that raises in its thread must fail the test, not leave the streamer waiting forever
    streamer = TextIteratorStreamer(smollm2.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
    result = {}

    def generate():
        try:
            result["done"] = complete(smollm2.model, smollm2.tokenizer, "The capital of France is", sinks=4, window=8,
                                      streamer=streamer, max_new_tokens=12)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread below
            result["error"] = error
            streamer.end()

    thread = threading.Thread(target=generate)
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "error" not in result, f"generation failed in its thread: {result.get('error')!r}"
    assert "".join(pieces).strip() == result["done"].text.strip() and result["done"].tokens == 12


def _start_chat(extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sinkless", "stream", "--model", "smollm2-135m", "--chat", "--window", "16", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        # a test run in the background inherits SIGINT ignored, and Python then installs no Ctrl-C handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_output(proc: subprocess.Popen, timeout: float = 300) -> bytes:
    deadline, out = time.monotonic() + timeout, b""
    while time.monotonic() < deadline and not out.strip():
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
    return out


def test_chat_exits_cleanly_on_ctrl_c_while_generating(smollm2):
    """SIGINT to a `sinkless stream --chat` process in the middle of a reply: exit status 130, no traceback."""
    proc = _start_chat(["--max-new-tokens", "100000"])
    try:
        proc.stdin.write(b"Tell me a long story about the sea.\n")
        proc.stdin.flush()
        assert _wait_for_output(proc).strip(), "no reply"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)  # generous: a loaded machine unwinds slowly
        err = err.decode()
    finally:
        proc.kill()
    print(f"SIGINT while generating: exit {proc.returncode}, stderr tail {err[-200:]!r}")
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err


def test_chat_exits_cleanly_on_ctrl_c_at_the_prompt(smollm2, monkeypatch, capsys):
    """Ctrl-C while waiting for the next line (after a first turn): status 130 and a one-line message."""
    from sinkless.cli import main

    class Keyboard:
        lines = ["Hi!\n"]

        def isatty(self):
            return False

        def readline(self):
            if self.lines:
                return self.lines.pop()
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Keyboard())
    assert main(["stream", "--model", "smollm2-135m", "--chat", "--window", "16", "--max-new-tokens", "3"]) == 130
    captured = capsys.readouterr()
    assert captured.out.strip() and "interrupted" in captured.err
