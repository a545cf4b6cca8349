"""Tokenizer and chat template of a model, without torch.

Owns: loading a ``Tokenizer`` for a ``ModelSource`` and rendering chat templates.
A Hugging Face directory with ``tokenizer.json`` is read directly with the
``tokenizers`` library. Anything else (a GGUF file, a directory with only a
sentencepiece model) is converted once by transformers in a *subprocess* (so the
calling process never imports torch) into a cache directory, then read the same
way. The cache is keyed by the source path, size and mtime, written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pdserve.common.model_source import ModelSource, resolve_model


class TokenizerError(ValueError):
    """The tokenizer could not be loaded or a chat template could not be applied."""


class NoTokenizerError(TokenizerError):
    """The model has no tokenizer by design (random weights): it takes token ids only."""


@dataclass(frozen=True)
class _Special:
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None


class Tokenizer:
    """Encode, decode and chat templates of one model (immutable after load)."""

    def __init__(self, directory: str):
        from tokenizers import Tokenizer as _HFTokenizer

        self._tok = _HFTokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        self._special = _read_special(directory, self._tok)
        self._template = _compile_template(self._special.chat_template)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._special.eos_token_ids

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages ([{role, content}, ...]) to the prompt text the model expects."""
        if self._template is None:
            raise TokenizerError("this model has no chat template; send a plain prompt instead")
        _check_messages(messages)
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._special.bos_token or "", eos_token=self._special.eos_token or "")

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # NOTE: the template already holds any BOS text, so no special tokens are added (as HF does).
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TokenizerError(f"messages[{i}] must be an object with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise TokenizerError(f"messages[{i}].content must be a string")


def _compile_template(source: str | None):
    if not source:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_special(directory: str, tok: Any) -> _Special:
    cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    template = cfg.get("chat_template")
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path) as fh:
            template = fh.read()
    ids: list[int] = []
    gen = _read_json(os.path.join(directory, "generation_config.json")).get("eos_token_id")
    for value in (gen if isinstance(gen, list) else [gen]):
        if isinstance(value, int):
            ids.append(value)
    if eos is not None and tok.token_to_id(eos) is not None:
        ids.append(tok.token_to_id(eos))
    return _Special(bos, eos, tuple(dict.fromkeys(ids)), template)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pdserve", "tokenizers")


def _cache_dir(source: ModelSource) -> str:
    st = os.stat(source.path)
    key = f"{os.path.abspath(source.path)}:{st.st_size}:{int(st.st_mtime)}"
    return os.path.join(cache_root(), hashlib.sha256(key.encode()).hexdigest()[:16])


def tokenizer_dir(source: ModelSource) -> str:
    """A directory with tokenizer.json for this source, converting once if needed."""
    if source.kind == "dummy":
        raise NoTokenizerError(f"model {source.name!r} has random weights and no tokenizer; send token ids")
    if source.kind == "hf" and os.path.exists(os.path.join(source.path, "tokenizer.json")):
        return source.path
    target = _cache_dir(source)
    if not os.path.exists(os.path.join(target, "tokenizer.json")):
        _convert_in_subprocess(source, target)
    return target


def _convert_in_subprocess(source: ModelSource, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".tmp-")
    try:
        cmd = [sys.executable, "-m", "pdserve.common.tokenizer", source.kind, source.path, tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise TokenizerError(f"could not convert the tokenizer of {source.name!r} with transformers: "
                                 f"{_last_line(proc.stderr)}")
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is equivalent
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _last_line(stderr: str) -> str:
    """The exception line of a Python traceback (the whole traceback is noise in a log line)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def load_tokenizer(model: str | ModelSource) -> Tokenizer:
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    return Tokenizer(tokenizer_dir(source))


def _convert_main(kind: str, path: str, out_dir: str) -> None:
    from transformers import AutoTokenizer

    if kind == "gguf":
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    else:
        tok = AutoTokenizer.from_pretrained(path)
    tok.save_pretrained(out_dir)
    if not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        raise SystemExit("transformers did not produce a tokenizer.json")


if __name__ == "__main__":
    _convert_main(*sys.argv[1:4])
