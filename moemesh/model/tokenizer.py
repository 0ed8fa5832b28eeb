"""The checkpoint's tokenizer (`tokenizer.json`, tokenizers library), its EOS ids and chat template, and an
incremental detokenizer that emits text only once it is complete UTF-8."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from moemesh.model.config import ModelConfig


class Tokenizer:
    def __init__(self, model_dir: str | Path, config: ModelConfig | None = None):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        self._tok = _HFTokenizer.from_file(str(path))
        self.eos_token_ids = _eos_ids(model_dir, config)
        self.chat_template: str | None = None
        self.bos_token: str | None = None
        tok_config = model_dir / "tokenizer_config.json"
        if tok_config.is_file():
            raw = json.loads(tok_config.read_text())
            self.chat_template = raw.get("chat_template")
            bos = raw.get("bos_token")
            self.bos_token = bos.get("content") if isinstance(bos, dict) else bos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template in tokenizer_config.json")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or ""
        )


def _eos_ids(model_dir: Path, config: ModelConfig | None) -> tuple[int, ...]:
    """EOS ids from generation_config.json, else config.json."""
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return config.eos_token_id if config is not None else ()


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas, holding back bytes of an unfinished UTF-8 character.

    Decodes a small window (tokens since `prefix_offset`) rather than the whole sequence each step."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids or [])
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Appends one token; returns the new complete text ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""
