"""--device / --dtype resolution."""

import argparse

import pytest
import torch

from sinkless.devices import add_device_args, autocast, resolve_device, resolve_dtype
from sinkless.errors import SinklessError


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["gpu", "tpu", "", "cuda:x"])
def test_bad_device_names(name):
    if name == "":
        assert resolve_device(name) == resolve_device("auto")
        return
    if name == "cuda:x" and not torch.cuda.is_available():
        with pytest.raises(SinklessError, match="sees no CUDA"):
            resolve_device(name)
        return
    with pytest.raises(SinklessError):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="machine has a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(SinklessError, match="--device cpu"):
        resolve_device("cuda")


def test_dtypes():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype(None) is torch.float32
    with pytest.raises(SinklessError, match="float32"):
        resolve_dtype("int8")


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    add_device_args(parser)
    args = parser.parse_args(["--device", "cpu", "--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cpu", "bfloat16")
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int4"])


def test_autocast_is_a_noop_on_cpu():
    with autocast("cpu"):
        x = torch.ones(2, 2) @ torch.ones(2, 2)
    assert x.dtype is torch.float32
