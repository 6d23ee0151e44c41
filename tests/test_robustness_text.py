"""Bad text: too short to measure, unmeasured quantities, empty or binary files, texts beyond the context."""

from __future__ import annotations

import json
import logging

import pytest

from robustness_helpers import expect_error, tiny_text_model_dir, words
from sinkless import zoo
from sinkless.cli import main
from sinkless.scan import ScanSettings, TextInput, scan

pytestmark = pytest.mark.robustness


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random causal LM with a word-level tokenizer, as a model folder."""
    return tiny_text_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def loaded(text_model):
    return zoo.load(str(text_model))


def _report(loaded, texts, **settings):
    report, _ = scan(loaded, [TextInput(f"t{i}", t) for i, t in enumerate(texts)], ScanSettings(**settings), progress=False)
    return report


@pytest.mark.parametrize("n_words", [1, 2, 4])
def test_text_too_short_gives_no_verdict(loaded, n_words):
    """One token attends to itself alone: 100 % first-token attention by construction, not a finding."""
    report = _report(loaded, [words(n_words)])  # the tokenizer adds no special tokens: n words = n tokens
    s = report.summary
    assert s["has_artifacts"] is None and s["has_first_token_sink"] is None
    assert s["sink_share"] is None and s["first_token_attention_max"] is None and s["sink_epsilon"] is None
    assert all(row["first_token_attention"] is None and row["sink_epsilon"] is None for row in report.layers)
    assert any("too short" in note for note in s["notes"])


def test_short_text_beside_a_long_one_counts_only_the_long(loaded):
    long_only = _report(loaded, [words(40)])
    mixed = _report(loaded, [words(40), words(1)])
    assert [r["first_token_attention"] for r in mixed.layers] == pytest.approx([r["first_token_attention"] for r in long_only.layers])
    assert mixed.summary["has_first_token_sink"] is long_only.summary["has_first_token_sink"]
    assert any("1 of 2" in note or "the 1 of 2" in note for note in mixed.summary["notes"])


def test_just_long_enough_is_measured(loaded):
    report = _report(loaded, [words(5)])  # warm-up 4: query 4 counts
    assert report.summary["sink_share"] is not None and report.summary["has_artifacts"] is not None


def test_no_attention_is_not_measured_not_zero(loaded, tmp_path, capsys, text_model):
    report = _report(loaded, [words(30)], attention=False)
    assert report.summary["sink_share"] is None and report.summary["has_first_token_sink"] is None
    assert all(row["first_token_attention"] is None for row in report.layers)
    assert main(["-q", "scan", "--model", str(text_model), "--text", words(30), "--no-attention", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "first-token attention: not measured" in out and "mean 0 %" not in out
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["summary"]["sink_share"] is None and data["summary"]["has_first_token_sink"] is None


def test_one_token_through_the_cli(text_model, tmp_path, capsys):
    assert main(["-q", "scan", "--model", str(text_model), "--text", "w1", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "ARTIFACTS FOUND" not in out and "no verdict" in out and "100 %" not in out


def test_max_tokens_beyond_a_rotary_context_warns(tmp_path, caplog):
    from sinkless._cli._args import max_tokens_for

    short = zoo.load(str(tiny_text_model_dir(tmp_path / "ctx16", context=16)))
    with caplog.at_level(logging.WARNING):
        assert max_tokens_for(short, 512) == 512
    assert "exceeds" in caplog.text and "16 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert max_tokens_for(short, 16) == 16
    assert caplog.text == ""


def test_max_tokens_beyond_learned_positions_is_lowered(tmp_path, capsys, caplog):
    folder = tiny_text_model_dir(tmp_path / "bert16", family="bert", context=16)
    with caplog.at_level(logging.WARNING):
        code = main(["-q", "scan", "--model", str(folder), "--text", words(100), "--max-tokens", "512", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err  # before: an index error deep inside the model
    assert "exceeds" in caplog.text
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["settings"]["max_tokens"] == 16 and data["inputs"][0]["tokens"] <= 16


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"   \n\t\n", "is empty"), (b"\xff\xfe\x00\x81 latin-1 \xe9t\xe9", "not UTF-8")],
    ids=["empty-file", "whitespace-file", "binary-file"],
)
def test_bad_text_files(tmp_path, capsys, text_model, content, message):
    (tmp_path / "in.txt").write_bytes(content)
    expect_error(["scan", str(tmp_path / "in.txt"), "--model", str(text_model), "--out", str(tmp_path / "out")], capsys, contains=message, root=tmp_path)


def test_empty_inline_text(tmp_path, capsys, text_model):
    expect_error(["scan", "--model", str(text_model), "--text", "  ", "--out", str(tmp_path / "out")], capsys, contains="--text is empty", root=tmp_path)


def test_text_to_a_vision_model(tmp_path, capsys):
    expect_error(["scan", "--model", "planted-vit-tiny", "--text", "hello", "--out", str(tmp_path / "out")], capsys,
                 contains="vision model", root=tmp_path)


def test_utf8_bom_emoji_and_unknown_words(tmp_path, capsys, text_model):
    (tmp_path / "in.txt").write_text("\ufeffw1 w2 🙂 w3 naïve w4 w5 w6 w7 w8", encoding="utf-8")
    assert main(["-q", "scan", str(tmp_path / "in.txt"), "--model", str(text_model), "--out", str(tmp_path / "o")]) == 0


def test_long_text_is_truncated(tmp_path, capsys, text_model):
    assert main(["-q", "scan", "--model", str(text_model), "--text", words(3000), "--max-tokens", "64", "--out", str(tmp_path / "o")]) == 0
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["inputs"][0]["tokens"] == 64


def test_a_one_word_text_for_a_bert_model(tmp_path, capsys):
    """BERT adds [CLS] and [SEP]: three tokens are still too few to measure first-token attention."""
    folder = tiny_text_model_dir(tmp_path / "bert", family="bert")
    assert main(["-q", "scan", "--model", str(folder), "--text", "w1", "--out", str(tmp_path / "o")]) == 0
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["summary"]["has_artifacts"] is None and data["summary"]["sink_share"] is None


@pytest.mark.parametrize("text", ["\n\n\n", "\t \t"], ids=["newlines", "tabs"])
def test_blank_inline_text(tmp_path, capsys, text_model, text):
    expect_error(["scan", "--model", str(text_model), "--text", text, "--out", str(tmp_path / "out")], capsys, contains="--text is empty", root=tmp_path)


@pytest.mark.parametrize("suffix", [".md", ".rst", ".TXT"])
def test_other_text_suffixes(tmp_path, capsys, text_model, suffix):
    (tmp_path / f"notes{suffix}").write_text(words(12))
    assert main(["-q", "scan", str(tmp_path / f"notes{suffix}"), "--model", str(text_model), "--out", str(tmp_path / "o")]) == 0


def test_windows_line_endings_and_nul_bytes(tmp_path, capsys, text_model):
    (tmp_path / "dos.txt").write_bytes(("\r\n".join(words(12).split()) + "\x00").encode())
    assert main(["-q", "scan", str(tmp_path / "dos.txt"), "--model", str(text_model), "--out", str(tmp_path / "o")]) == 0


def test_text_folder_with_images_reads_only_the_text(tmp_path, capsys, text_model):
    from PIL import Image

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(words(10))
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "b.png")
    assert main(["-q", "scan", str(tmp_path / "in"), "--model", str(text_model), "--out", str(tmp_path / "o")]) == 0
    assert [i["name"] for i in json.loads((tmp_path / "o" / "report.json").read_text())["inputs"]] == [str(tmp_path / "in" / "a.txt")]


def test_a_text_folder_passed_where_a_file_is_read(tmp_path):
    from sinkless._io import read_utf8
    from sinkless.errors import SinklessError

    with pytest.raises(SinklessError, match="is a folder, not a text file"):
        read_utf8(tmp_path)


def test_stream_refuses_text_that_is_not_utf8_and_a_zero_penalty(tmp_path, capsys):
    folder = tiny_text_model_dir(tmp_path / "lm", context=32)
    expect_error(["stream", "--model", str(folder), "--prompt", "w1 \udcff w2", "--max-new-tokens", "2"], capsys,
                 contains="not valid UTF-8", root=tmp_path)
    expect_error(["stream", "--model", str(folder), "--prompt", "w1 w2", "--max-new-tokens", "2", "--repetition-penalty", "0"], capsys,
                 contains="--repetition-penalty must be > 0", root=tmp_path)
    expect_error(["stream", "--model", str(folder), "--prompt", "w1 w2", "--system", "be brief"], capsys,
                 contains="--system is the system message of a --chat", root=tmp_path)


def test_stream_past_the_context_prints_no_transformers_reminder(tmp_path, capsys):
    folder = tiny_text_model_dir(tmp_path / "lm", context=32)
    assert main(["stream", "--model", str(folder), "--prompt", "w1 w2 w3", "--max-new-tokens", "40", "--window", "8"]) == 0
    assert "predefined maximum length" not in capsys.readouterr().err


def test_a_byte_order_mark_is_not_token_0(tmp_path, capsys):
    folder = tiny_text_model_dir(tmp_path / "lm")
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("w1 w2 w3 w4 w5 w6 w7 w8")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    reports = []
    for path in (plain, marked):
        assert main(["-q", "scan", str(path), "--model", str(folder), "--out", str(tmp_path / path.stem)]) == 0
        reports.append(json.loads((tmp_path / path.stem / "report.json").read_text())["inputs"][0]["text_tokens"])
    assert reports[0] == reports[1]
    (tmp_path / "only.txt").write_bytes(b"\xef\xbb\xbf")
    expect_error(["scan", str(tmp_path / "only.txt"), "--model", str(folder), "--out", str(tmp_path / "o")], capsys, contains="is empty",
                 root=tmp_path)


def test_text_with_no_tokens_is_one_error(tmp_path):
    from sinkless.errors import SinklessError
    from sinkless.scan.inputs import _text_batch

    class Nothing:  # a tokenizer whose vocabulary covers none of the text
        def __call__(self, text, **kwargs):
            return {"input_ids": []}

    with pytest.raises(SinklessError, match="gives no tokens with this model's tokenizer"):
        _text_batch(zoo.Loaded("m", None, None, tokenizer=Nothing()), [TextInput("t", "w1 w2")], 512)


def test_an_encoder_whose_attention_is_not_a_probability_is_refused(tmp_path, capsys):
    """A T5 encoder's captured attention read as shares gave "first-token attention: mean -9 %": refused, --no-attention works."""
    import shutil

    import transformers

    folder = tiny_text_model_dir(tmp_path / "lm")
    t5 = tmp_path / "t5"
    transformers.T5EncoderModel(transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=64)).save_pretrained(t5)
    for f in folder.iterdir():
        if "token" in f.name:
            shutil.copy(f, t5 / f.name)
    expect_error(["scan", "--text", "w1 w2 w3 w4 w5 w6", "--model", str(t5), "--out", str(tmp_path / "o")], capsys,
                 contains="is not a probability", root=tmp_path)
    assert main(["-q", "scan", "--text", "w1 w2 w3 w4 w5 w6", "--model", str(t5), "--no-attention", "--out", str(tmp_path / "o2")]) == 0
