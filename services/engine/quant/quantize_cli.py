"""``pdserve quantize smoothquant``: make a W8A8 checkpoint from a float model.

Owns the tool around ``smoothquant``: reading the source (a Hugging Face directory,
the default model or a .gguf file, loaded in float32 with transformers), the
calibration text (Python's own ``pydoc_data`` topics, or a file), a progress bar
while calibrating, and writing the output directory: ``model.safetensors`` (int8
weights with per-channel scales, everything else as loaded), ``config.json`` with
a compressed-tensors ``quantization_config`` (so other engines load it too) and
the tokenizer files. ``--eval`` then prints both models' perplexity on held-out
text (``evaluate``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

_SKIP = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve quantize smoothquant",
                                description="SmoothQuant W8A8 (int8 weights per channel, int8 activations per token)")
    p.add_argument("--model", required=True, help="a Hugging Face directory, smollm2 or a .gguf file")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--alpha", type=float, default=0.5, help="migration strength in [0, 1] (default 0.5)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--calib-file", help="calibration text file (default: Python's pydoc topics)")
    p.add_argument("--eval", action="store_true", help="print perplexity before and after on held-out text")
    return p


def main(name: str, argv: list[str]) -> int:
    if not argv or argv[0] != "smoothquant":
        print("usage: pdserve quantize smoothquant --model M --out DIR [options]  (see --help)", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv[1:])
    try:
        run(args)
    except (ValueError, OSError) as exc:
        print(f"pdserve quantize: {exc}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    from pdserve.common.model_source import resolve_model
    from pdserve.common.tokenizer import load_tokenizer, tokenizer_dir
    from pdserve.engine.quant.scheme import W8A8Scheme
    from pdserve.engine.quant.smoothquant import SmoothQuantConfig

    cfg = SmoothQuantConfig(args.alpha, args.calib_samples, args.calib_len)
    if os.path.exists(args.out) and os.listdir(args.out):
        raise ValueError(f"output directory {args.out!r} is not empty")
    source = resolve_model(args.model)
    if source.kind == "dummy":
        raise ValueError("dummy models have random weights: quantize a real checkpoint")
    text = _read(args.calib_file) if args.calib_file else calibration_text()
    windows = calibration_windows(load_tokenizer(source).encode(text), cfg)
    model, config = _load_float(source)
    state = quantize_model(model, windows, cfg, W8A8Scheme())
    config["quantization_config"] = W8A8Scheme().quantization_config()
    write_checkpoint(args.out, state, config, tokenizer_dir(source))
    print(f"wrote {args.out} (W8A8, alpha {cfg.alpha}, {len(windows)} calibration windows)", file=sys.stderr)
    if args.eval:
        _print_eval(args.model, args.out)


def calibration_text() -> str:
    """Text every Python install ships: the pydoc topics (language reference prose)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_windows(ids: list[int], cfg) -> list[list[int]]:
    windows = [ids[i:i + cfg.calib_len] for i in range(0, len(ids) - cfg.calib_len + 1, cfg.calib_len)]
    if not windows:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than --calib-len {cfg.calib_len}")
    return windows[:cfg.calib_samples]


def quantize_model(model, windows: list[list[int]], cfg, scheme) -> dict:
    from tqdm import tqdm

    from pdserve.engine.quant.smoothquant import calibrate, quantize_weights, smooth

    with tqdm(total=len(windows), desc="calibrating", unit="window", file=sys.stderr, disable=None) as bar:
        maxima = calibrate(model, windows, lambda: bar.update(1))
    smooth(model, maxima, cfg.alpha)
    return quantize_weights(model, scheme)


def _load_float(source):
    """(transformers model in float32, its config.json dict)."""
    import torch
    from transformers import AutoModelForCausalLM

    if source.kind == "gguf":
        return _load_gguf(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    config = json.loads(_read(os.path.join(source.path, "config.json")))
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):  # NOTE: local paths, old scheme
        config.pop(key, None)
    return model.eval(), config


def _load_gguf(path: str):
    """A GGUF file through the engine's own conversion (dequantized once into the user cache,
    Hugging Face names and layouts): transformers then reads safetensors instead of parsing the
    GGUF itself (the default model, conversion cached: a few seconds instead of ~45)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from pdserve.engine.models.loader import gguf_checkpoint
    from pdserve.engine.models.model_config import to_hf_config

    cfg, weights = gguf_checkpoint(path)
    config = to_hf_config(cfg)
    config["dtype"] = "float32"
    with tempfile.TemporaryDirectory(prefix="pdserve-quantize-") as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(config, fh)
        for name in os.listdir(weights):
            if name.endswith(".safetensors"):
                os.symlink(os.path.join(weights, name), os.path.join(tmp, name))
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return model.eval(), config


def write_checkpoint(out: str, state: dict, config: dict, tokenizer_src: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
    for name in os.listdir(tokenizer_src):
        path = os.path.join(tokenizer_src, name)
        if os.path.isfile(path) and name != "config.json" and not name.endswith(_SKIP) and "index" not in name:
            shutil.copy(path, os.path.join(out, name))


def _print_eval(base: str, quantized: str) -> None:
    from pdserve.engine.evaluate import heldout_text, perplexity

    text = heldout_text()
    before, after = perplexity(base, text), perplexity(quantized, text)
    delta = 100 * (after.perplexity / before.perplexity - 1)
    print(f"perplexity on {before.tokens} held-out tokens: {before.perplexity:.3f} -> {after.perplexity:.3f} "
          f"({delta:+.2f}%)")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


__all__ = ["calibration_text", "calibration_windows", "main", "quantize_model", "write_checkpoint"]
