"""train-attn / compare-attn: CPU smoke runs of every variant, resumption, bad input, the comparison table."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sinkless.attention import VARIANTS, load
from sinkless.cli import main

SMOKE = ["--task", "lm", "--size", "tiny", "--device", "cpu", "--text-source", "hamlet", "-q"]


def _train(out, variant, *extra):
    args = ["-q", "train-attn", "--variant", variant, *[a for a in SMOKE if a != "-q"], "--out", str(out), *extra]
    return main(args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny LM run per variant (same seed, data and budget)."""
    root = tmp_path_factory.mktemp("train-attn")
    for variant in VARIANTS:
        assert _train(root / variant, variant) == 0
    return root


@pytest.mark.parametrize("variant", VARIANTS)
def test_smoke_run_writes_result_with_metrics(runs, variant):
    result = json.loads((runs / variant / "result.json").read_text())
    assert result["variant"] == variant and result["steps_done"] == 8
    assert result["loss_curve"] and result["loss_curve"][-1]["step"] == 8
    m = result["metrics"]
    assert len(m["first_token_attention"]) == 2 and all(0 <= v <= 1 for v in m["first_token_attention"])
    assert len(m["sink_epsilon"]) == 2 and m["max_activation"] > 0 and m["max_activation_ratio"] >= 1
    assert isinstance(m["outlier_tokens"], int)
    assert result["eval"]["eval_loss"] < result["eval_before"]["eval_loss"] + 0.5
    assert json.loads((runs / variant / "report.json").read_text())["model"].startswith("train-attn")
    assert result["sinkless_version"] and result["data"]["fingerprint"]


def test_every_variant_saw_the_same_data_and_start(runs):
    results = [json.loads((runs / v / "result.json").read_text()) for v in VARIANTS]
    assert len({r["data"]["fingerprint"] for r in results}) == 1
    assert len({json.dumps(r["config"], sort_keys=True) for r in results}) == 1
    # softmax and gated start from the same base weights: their first training losses are close
    first = {r["variant"]: r["loss_curve"][0]["loss"] for r in results}
    assert abs(first["softmax"] - first["gated"]) < 0.05


@pytest.mark.parametrize("variant", ["gated", "sinklogit"])
def test_trained_model_reloads_with_its_attention(runs, variant):
    loaded = load(runs / variant / "model")
    assert loaded.info["attention"]["variant"] == variant
    ids = loaded.tokenizer("To be, or not to be", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == loaded.tokenizer.bos_token_id
    assert torch.isfinite(loaded.model(input_ids=ids).logits).all()


def test_compare_attn_renders_the_table_and_plot(runs, tmp_path, capsys):
    folders = [str(runs / v) for v in VARIANTS]
    assert main(["compare-attn", *folders, "--plot", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json")]) == 0
    table = capsys.readouterr().out
    for variant in VARIANTS:
        assert f"| {variant}" in table
    assert "Sink_eps" in table and (tmp_path / "c.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "c.json").read_text())["runs"]) == len(VARIANTS)


def test_resume_continues_to_the_same_result(tmp_path, monkeypatch):
    from sinkless.attention import data as data_module
    from sinkless.attention.train import train_attention

    kwargs = dict(size="tiny", steps=6, sources=["hamlet"], progress=False)
    full = train_attention("sinklogit", "lm", tmp_path / "full", **kwargs)
    calls = {"n": 0}
    windows = data_module.Corpus.windows

    def interrupted(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4: steps 1-3 are checkpointed
            raise KeyboardInterrupt
        return windows(self, *args, **kw)

    monkeypatch.setattr(data_module.Corpus, "windows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_attention("sinklogit", "lm", tmp_path / "part", **kwargs)
    monkeypatch.setattr(data_module.Corpus, "windows", windows)
    assert not (tmp_path / "part" / "result.json").exists()
    resumed = train_attention("sinklogit", "lm", tmp_path / "part", resume=True, **kwargs)
    assert resumed["steps_done"] == 6
    assert resumed["eval"]["eval_loss"] == pytest.approx(full["eval"]["eval_loss"], abs=1e-6)
    # a finished run is not silently overwritten
    with pytest.raises(Exception, match="already holds a finished"):
        train_attention("sinklogit", "lm", tmp_path / "full", **kwargs)


def test_vit_smoke_run(tmp_path):
    out = tmp_path / "vit"
    assert main(["-q", "train-attn", "--variant", "sigmoid", "--task", "vit", "--size", "tiny", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "vit" and "eval_accuracy" in result["eval"]
    assert len(result["metrics"]["first_token_attention"]) == 2
    assert (out / "model" / "head.safetensors").is_file()
    assert load(out / "model").image_spec.size == 16


@pytest.mark.parametrize(
    "args,message",
    [
        (["--variant", "relu"], "invalid choice"),
        (["--variant", "gated", "--steps", "0"], "--steps must be >= 1"),
        (["--variant", "gated", "--lr", "-1"], "learning rate must be a positive number"),
        (["--variant", "gated", "--lr", "nan"], "learning rate must be a positive number"),
        (["--variant", "gated", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--variant", "gated", "--device", "cuda"] if not torch.cuda.is_available() else ["--variant", "relu"], "cuda" if not torch.cuda.is_available() else "invalid choice"),
        (["--variant", "gated", "--from", "minilm-l6"], "not a causal language model"),
        (["--variant", "gated", "--from", "/nonexistent/model"], "not a zoo name"),
        (["--variant", "gated", "--task", "vit", "--from", "smollm2-135m"], "--from fine-tunes"),
    ],
)
def test_bad_input_is_a_clear_error_with_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) if message == "invalid choice" else _no_exit():
        code = main(["train-attn", *args, "--size", "tiny", "--out", str(out)])
        assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unconvertible_pretrained_family_is_refused(tmp_path, capsys, monkeypatch):
    """A causal LM whose attention cannot be converted (GPT-2): exit 2 before any data is built."""
    from conftest import tiny_model

    folder = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(folder)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))).save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["train-attn", "--variant", "sigmoid", "--from", str(folder), "--out", str(out)]) == 2
    assert "cannot be converted" in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_out_is_refused(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    assert main(["train-attn", "--variant", "gated", "--size", "tiny", "--out", str(blocker / "run")]) == 2
    assert f"cannot be created: {blocker} is a file, not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        assert main(["train-attn", "--variant", "gated", "--size", "tiny", "--out", str(locked / "run")]) == 2


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["train-attn", "--variant", "gated", "--size", "tiny", "--out", str(target)]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_compare_attn_bad_folder(tmp_path, capsys):
    (tmp_path / "result.json").write_text("{not json")
    assert main(["compare-attn", str(tmp_path)]) == 2
    assert "not a train-attn result" in capsys.readouterr().err


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_trained_variant_is_what_every_verb_loads(runs, capsys):
    """ppl (and scan) of a train-attn model folder run its attention variant, not softmax; streaming it is refused."""
    from sinkless import zoo

    folder = runs / "sigmoid" / "model"
    loaded = zoo.load(str(folder))
    assert loaded.model.config._attn_implementation == load(folder).model.config._attn_implementation != "sdpa"
    assert main(["-q", "ppl", "--model", str(folder), "--mode", "full", "--max-tokens", "64", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["ppl", "--model", str(folder), "--mode", "sink", "--max-tokens", "64", "--no-progress"]) == 2
    assert "trained with sigmoid attention" in capsys.readouterr().err


def test_an_occupied_out_and_mixed_tasks_are_refused(runs, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert _train(mine, "softmax", "--steps", "2") == 2
    assert "is not empty and holds no train-attn run" in capsys.readouterr().err and os.listdir(mine) == ["notes.txt"]
    vit = tmp_path / "vit"
    assert main(["-q", "train-attn", "--variant", "gated", "--task", "vit", "--size", "tiny", "--steps", "2", "--out", str(vit)]) == 0
    capsys.readouterr()
    assert main(["compare-attn", str(vit), str(runs / "gated")]) == 2
    assert "different tasks" in capsys.readouterr().err


def test_gate_without_the_gated_variant_is_refused(tmp_path, capsys):
    assert _train(tmp_path / "s", "sigmoid", "--gate", "headwise", "--steps", "2") == 2
    assert "--gate applies to --variant gated" in capsys.readouterr().err and not (tmp_path / "s").exists()
