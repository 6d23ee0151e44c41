"""``sinkless train-attn``: train a small model with one attention variant, then measure its sinks.

Two tasks: ``lm``, a small Llama-style causal LM on offline English text (``attention.data``), and
``vit``, a tiny ViT classifying natural crops by source photograph. Or ``from_model`` fine-tunes a
converted pretrained LM (``smollm2-135m``) on the same text. Every variant of one configuration gets
the same base weights (one seed), the same token windows (drawn from the training loop's per-step
generator) and the same step budget, so the runs differ only in attention. Training is the shared
resumable loop (``sinkless.training``: AdamW, warm-up + cosine, atomic checkpoints, JSON log).

The result folder holds ``result.json`` (settings, loss curve, held-out loss / perplexity and the sink
metrics of ``attention.metrics`` before and after training), ``report.json`` (the scan report of the
trained model), ``model/`` (``save_pretrained``; reload with ``sinkless.attention.load``), and the
loop's ``checkpoint.pt`` / ``train_log.json``. Gu et al. 2025 (sigmoid / ELU+1), Qiu et al. 2025
(gated), gpt-oss (sink logit).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sinkless._io import atomic_write_json, check_writable, staged_dir
from sinkless._version import __version__
from sinkless.adapters import ADAPTERS
from sinkless.attention.convert import VARIANTS, AttentionSpec, convert
from sinkless.attention.metrics import sink_metrics
from sinkless.devices import resolve_device
from sinkless.errors import SinklessError
from sinkless.images import IMAGENET_MEAN, IMAGENET_STD, ImageSpec
from sinkless.scan import ImageInput, ScanSettings, TextInput
from sinkless.training import LOG, TrainSettings, train
from sinkless.zoo import Loaded

__all__ = ["TASKS", "SIZES", "RunConfig", "train_attention", "RESULT"]

log = logging.getLogger(__name__)

TASKS = ("lm", "vit")
RESULT = "result.json"


@dataclass(frozen=True)
class RunConfig:
    """One train-attn run: the model shape, the data and the optimisation budget."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    context: int  # lm: tokens per window; vit: image side in pixels
    batch: int
    steps: int
    lr: float
    vocab: int = 2048  # lm from scratch: BPE vocabulary
    patch: int = 4  # vit
    warmup: float = 0.1  # share of the steps
    weight_decay: float = 0.1
    eval_windows: int = 32  # held-out windows (lm) / crops (vit) for the loss and the sink metrics
    metric_inputs: int = 16
    metric_tokens: int = 64  # Gu et al.'s Sink_eps protocol: 64-token prompts
    max_chars: int | None = None  # lm: characters read per text source (None: all)


SIZES: dict[tuple[str, str], RunConfig] = {
    ("lm", "tiny"): RunConfig(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, context=32, batch=4, steps=8, lr=3e-3, vocab=320, eval_windows=4, metric_inputs=2, metric_tokens=24, max_chars=30_000),
    ("lm", "small"): RunConfig(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, context=128, batch=16, steps=1000, lr=3e-3),
    ("vit", "tiny"): RunConfig(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, context=16, batch=8, steps=8, lr=3e-3, eval_windows=8, metric_inputs=2),
    ("vit", "small"): RunConfig(hidden=96, layers=6, heads=4, kv_heads=4, intermediate=192, context=32, batch=32, steps=1000, lr=1e-3, eval_windows=128, metric_inputs=16),
}
FINETUNE = RunConfig(hidden=0, layers=0, heads=0, kv_heads=0, intermediate=0, context=64, batch=4, steps=40, lr=1e-4, weight_decay=0.0, eval_windows=16)
FROZEN = ("embed_tokens", "lm_head")  # fine-tunes keep the (tied) embeddings: the largest and slowest gradient on CPU


def _check_out(out: Path, resume: bool) -> bool:
    """Fail early (before any work) on an unwritable or occupied --out; True when this call created it."""
    if (out / RESULT).exists() and not resume:
        raise SinklessError(f"{out} already holds a finished train-attn run", fix="choose a new --out folder (or delete it)")
    if (out / "checkpoint.pt").exists() and not resume:
        raise SinklessError(f"{out} already holds a checkpoint of an earlier run", fix="pass --resume to continue it, or choose a new --out folder")
    if out.is_dir() and not (out / RESULT).exists() and not (out / "checkpoint.pt").exists() and any(out.iterdir()):
        raise SinklessError(f"--out {out} is not empty and holds no train-attn run" + (" to resume" if resume else ""),
                            fix="choose a new or empty folder: the run's files would mix with what is there")
    check_writable(out, directory=True, what="--out")  # also: a file, not a folder
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SinklessError(f"cannot make --out {out} ({error.strerror or error})", fix="choose a folder you can write to") from None
    return created


def _lm_from_scratch(cfg: RunConfig, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.context,
        tie_word_embeddings=True, bos_token_id=0, pad_token_id=1, eos_token_id=None,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)  # the same base weights for every variant
    return LlamaForCausalLM(config)


def _vit_from_scratch(cfg: RunConfig, seed: int):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
        image_size=cfg.context, patch_size=cfg.patch, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    config.architectures = ["ViTModel"]
    torch.manual_seed(seed)
    return ViTModel(config, add_pooling_layer=False)


def train_attention(
    variant: str,
    task: str,
    out: str | os.PathLike,
    *,
    size: str = "small",
    steps: int | None = None,
    device: str = "cpu",
    from_model: str | None = None,
    resume: bool = False,
    seed: int = 0,
    lr: float | None = None,
    batch: int | None = None,
    sources: list[str] | None = None,
    gate: str = "elementwise",
    progress: bool = True,
) -> dict:
    """Train one variant and write ``out``; returns the ``result.json`` content. See the module docstring."""
    if variant not in VARIANTS:
        raise SinklessError(f"unknown attention variant {variant!r}", fix=f"choose one of {', '.join(VARIANTS)}")
    if task not in TASKS:
        raise SinklessError(f"unknown task {task!r}", fix=f"choose one of {', '.join(TASKS)}")
    if (task, size) not in SIZES:
        raise SinklessError(f"unknown size {size!r}", fix="choose tiny or small")
    if steps is not None and steps < 1:
        raise SinklessError(f"--steps must be >= 1, got {steps}")
    if from_model is not None and task != "lm":
        raise SinklessError("--from fine-tunes a pretrained causal LM", fix="use --task lm with --from, or train a ViT from scratch")
    spec = AttentionSpec(variant, gate=gate)
    dev = resolve_device(device)
    cfg = SIZES[(task, size)] if from_model is None else FINETUNE
    if batch is not None and batch < 1:
        raise SinklessError(f"--batch-size must be >= 1, got {batch}")
    cfg = replace(cfg, steps=steps or cfg.steps, lr=cfg.lr if lr is None else lr, batch=batch or cfg.batch)
    _settings(cfg, seed)  # bad numbers (lr <= 0, NaN) fail here, before any work
    out = Path(out).expanduser()
    created = _check_out(out, resume)
    started = time.perf_counter()
    try:
        return _run(spec, task, size, cfg, out, dev, from_model, resume, seed, sources, progress, started)
    except SinklessError:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _settings(cfg: RunConfig, seed: int) -> TrainSettings:
    """The training loop's settings: AdamW (0.9, 0.95), 10 % linear warm-up, cosine to lr / 10."""
    return TrainSettings(
        steps=cfg.steps, lr=cfg.lr, warmup=int(cfg.warmup * cfg.steps), weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
        seed=seed, checkpoint_every=max(1, min(100, cfg.steps // 4)), log_every=max(1, min(10, cfg.steps // 20)),
    )


def _run(spec, task, size, cfg, out, dev, from_model, resume, seed, sources, progress, started) -> dict:
    head = None
    if task == "lm":
        from sinkless.attention.data import build_corpus

        if from_model is not None:
            from sinkless import zoo

            loaded = zoo.load(from_model)
            if loaded.tokenizer is None or not loaded.adapter.causal:
                raise SinklessError(f"--from {from_model}: not a causal language model", fix="use smollm2-135m or another Llama/Qwen3 causal LM")
            from sinkless.attention.convert import attention_modules

            attention_modules(loaded.model)  # "cannot be converted" before the corpus is built
            corpus = build_corpus(sources, loaded.tokenizer)
            init = "preserve"
        else:
            corpus = build_corpus(sources, vocab_size=cfg.vocab, max_chars=cfg.max_chars)
            model = _lm_from_scratch(cfg, len(corpus.tokenizer), seed)
            loaded = Loaded(f"train-attn-{spec.variant}", model, ADAPTERS["llama"], tokenizer=corpus.tokenizer)
            init = "random"
        model = loaded.model
        sigmoid_bias = -math.log(cfg.context) if spec.variant == "sigmoid" else None
        spec = replace(spec, sigmoid_bias=sigmoid_bias)
        eval_ids = corpus.held_out_windows(cfg.eval_windows, cfg.context)
        metric_inputs = [TextInput(f"held-out-{i}", t) for i, t in enumerate(corpus.texts(cfg.metric_inputs, cfg.metric_tokens))]
        data_info = {"sources": corpus.sources, "train_tokens": len(corpus.train), "held_out_tokens": len(corpus.held_out),
                     "fingerprint": corpus.fingerprint(), "bos": corpus.bos}
    else:
        from sinkless.attention.data import image_pool

        image_spec = ImageSpec(size=cfg.context, mean=IMAGENET_MEAN, std=IMAGENET_STD, patch_size=cfg.patch)
        pool = image_pool(2048 if size == "small" else 32, cfg.context, image_spec, seed=seed)
        held = image_pool(cfg.eval_windows, cfg.context, image_spec, seed=seed + 10_000)
        model = _vit_from_scratch(cfg, seed)
        head = torch.nn.Linear(cfg.hidden, pool.n_classes)
        loaded = Loaded(f"train-attn-{spec.variant}", model, ADAPTERS["vit"], image_spec)
        init = "random"
        metric_inputs = [ImageInput(f"held-out-{i}", im) for i, im in enumerate(held.images[: cfg.metric_inputs])]
        data_info = {"images": "natural_crops", "train_images": len(pool.labels), "held_out_images": len(held.labels), "classes": pool.n_classes}

    convert(model, spec, init=init, generator=torch.Generator().manual_seed(seed + 1))
    model.to(dev)
    if head is not None:
        head.to(dev)
    scan_settings = ScanSettings(batch_size=8, max_tokens=cfg.metric_tokens + 8)
    before = sink_metrics(loaded, metric_inputs, scan_settings)["metrics"] if from_model else None

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        try:
            if task == "lm":
                ids = eval_ids.to(dev)
                losses = [float(model(input_ids=ids[i : i + 8], labels=ids[i : i + 8]).loss) for i in range(0, len(ids), 8)]
                loss = sum(losses) / len(losses)
                return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}
            logits = head(model(pixel_values=held.pixels.to(dev)).last_hidden_state[:, 0])
            labels = held.labels.to(dev)
            return {"eval_loss": float(torch.nn.functional.cross_entropy(logits, labels)), "eval_accuracy": float((logits.argmax(-1) == labels).float().mean())}
        finally:
            model.train()

    eval_before = evaluate()

    def step(t: int, generator: torch.Generator) -> dict:
        model.train()
        if task == "lm":
            ids = corpus.windows(cfg.batch, cfg.context, generator).to(dev)  # (B, context)
            return {"loss": model(input_ids=ids, labels=ids).loss}
        pixels, labels = pool.batch(cfg.batch, generator)
        logits = head(model(pixel_values=pixels.to(dev)).last_hidden_state[:, 0])  # CLS -> classes
        return {"loss": torch.nn.functional.cross_entropy(logits, labels.to(dev))}

    eval_every = max(1, cfg.steps // (4 if from_model else 10))
    if from_model:
        for name, p in model.named_parameters():
            if any(f in name for f in FROZEN):
                p.requires_grad_(False)  # no weight gradient computed at all
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if head is not None:
        params.update({f"head.{n}": p for n, p in head.named_parameters()})
    meta = {
        "job": "train-attn", "variant": spec.variant, "task": task, "size": size if from_model is None else None,
        "from": from_model, "frozen": list(FROZEN) if from_model else [], "attention": spec.to_dict(), "config": asdict(cfg), "data": data_info, "seed": seed,
        "job_key": {"variant": spec.variant, "task": task, "size": size, "from": from_model, "config": asdict(cfg), "data": data_info, "seed": seed},
    }
    settings = _settings(cfg, seed)
    result = train(
        params, step, settings, out, meta=meta, resume=resume, progress=progress,
        on_log=lambda t, row: evaluate() if t % eval_every == 0 or t == cfg.steps else None,
        desc=f"train-attn {spec.variant}",
    )
    model.eval()
    final_eval = evaluate()
    after = sink_metrics(loaded, metric_inputs, scan_settings)
    with staged_dir(out / "model") as stage:
        model.to("cpu").save_pretrained(stage)
        if task == "lm":
            loaded.tokenizer.save_pretrained(stage)
        else:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(stage / "head.safetensors"))
    data = {
        "sinkless_version": __version__,
        "model": from_model or loaded.name,
        **{k: v for k, v in meta.items() if k != "job_key"},
        "settings": settings.to_dict(),
        "steps_done": result.steps_done,
        "train_seconds": round(result.seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "parameters": sum(p.numel() for p in params.values()),
        "final_loss": result.final_loss,
        "eval_before": eval_before,
        "eval": final_eval,
        "loss_curve": result.curve,
        "metrics_before": before,
        "metrics": after["metrics"],
    }
    atomic_write_json(out / "report.json", after["report"])
    atomic_write_json(out / RESULT, data)
    log.info("train-attn %s: eval loss %.4f -> %.4f; first-token attention max %s (log: %s)", spec.variant,
             eval_before["eval_loss"], final_eval["eval_loss"], after["metrics"]["first_token_attention_max"], out / LOG)
    return data
