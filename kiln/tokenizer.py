"""Tokenizer, chat template and incremental detokenizer.

Built on the `tokenizers` library; the loaders construct one from an HF
directory (`tokenizer.json`) or from GGUF metadata. Used by the Python API
and the HTTP server; imports nothing else from kiln.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, eos_token_ids: list[int] | None = None) -> None:
        self.tk = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.eos_token_ids = list(eos_token_ids or [])
        if not self.eos_token_ids and eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
            self.eos_token_ids = [tokenizer.token_to_id(eos_token)]
        self._template: jinja2.Template | None = None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                               extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added here.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    @classmethod
    def synthetic(cls, vocab_size: int, eos_token_id: int | None = None) -> "Tokenizer":
        """Made-up words "t0".."tN" for random-weight models: text in, text out, no meaning.

        Lets speed work run the whole path (chat template, detokenization, HTTP)
        on a model shape for which no tokenizer exists.
        """
        from tokenizers import models, pre_tokenizers

        tk = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        eos = f"t{eos_token_id}" if eos_token_id is not None else None
        template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
        return cls(tk, template, None, eos, [eos_token_id] if eos_token_id is not None else [])

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        tk_file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tk_file):
            raise ValueError(f"{path} has no tokenizer.json")
        try:
            tk = HFTokenizer.from_file(tk_file)
        except Exception as e:
            raise ValueError(f"{tk_file} is not a valid tokenizer file: {e}") from None
        cfg = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja_file):
            with open(jinja_file) as f:
                template = f.read()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])

        def token(key: str) -> str | None:
            v = cfg.get(key)
            return v.get("content") if isinstance(v, dict) else v

        eos_ids = list(cfg.get("eos_token_ids") or [])  # kiln's engine directories record them here
        gen_file = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_file):
            with open(gen_file) as f:
                e = json.load(f).get("eos_token_id")
            eos_ids = [e] if isinstance(e, int) else list(e or [])
        return cls(tk, template, token("bos_token"), token("eos_token"), eos_ids)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Byte-level tokens can end inside a multi-byte character; such text (which
    decodes to U+FFFD) is held back until the next tokens complete it. A few
    prompt tokens give the decoder context, so a leading space is kept.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""


def find_stop(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends within the last `new_len` chars of `text`."""
    best = None
    for s in stops:
        start = max(0, len(text) - new_len - len(s) + 1)
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best
