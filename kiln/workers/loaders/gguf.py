"""GGUF files: config, dequantized weights (HF names) and tokenizer from metadata."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from kiln.config import ModelConfig
from kiln.tokenizer import Tokenizer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Pre-tokenizer regexes by `tokenizer.ggml.pre` (the same ones llama.cpp and HF use).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (it interleaves the two rotary halves of each head)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    def __init__(self, path: str) -> None:
        import gguf  # imported here: only GGUF users need it

        self.path = path
        self._gguf = gguf
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:
            raise ValueError(f"{path} is not a valid GGUF file: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r} in {path}; kiln supports GGUF architectures "
                             f"{', '.join(ARCHITECTURES)}")
        self.arch = arch
        self.config = self._config()
        block_quants = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
        self.quant_block = 32 if any(t.tensor_type.name in block_quants for t in self.reader.tensors) else None

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value

    def _config(self) -> ModelConfig:
        a = self.arch
        heads = int(self.get(f"{a}.attention.head_count"))
        hidden = int(self.get(f"{a}.embedding_length"))
        tokens = self.get("tokenizer.ggml.tokens") or []
        scaling = None
        if "rope_freqs.weight" in self.tensors:
            scaling = {"rope_type": "freq_factors",
                       "factors": np.asarray(self.tensors["rope_freqs.weight"].data, dtype=np.float32).tolist()}
        elif self.get(f"{a}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(self.get(f"{a}.rope.scaling.factor"))}
        elif self.get(f"{a}.rope.scaling.type") not in (None, "none"):
            raise ValueError(f"unsupported rope scaling {self.get(f'{a}.rope.scaling.type')!r} in {self.path}")
        return ModelConfig(
            architecture=ARCHITECTURES[a],
            vocab_size=int(self.get(f"{a}.vocab_size", len(tokens))),
            hidden_size=hidden,
            intermediate_size=int(self.get(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self.get(f"{a}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(self.get(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self.get(f"{a}.attention.key_length", hidden // heads)),
            max_position_embeddings=int(self.get(f"{a}.context_length", 4096)),
            rms_norm_eps=float(self.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.get(f"{a}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            attention_bias="blk.0.attn_q.bias" in self.tensors,
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=self.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.get("tokenizer.ggml.eos_token_id"),
            name=str(self.get("general.name", "gguf")),
        )

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.config
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            w = self._gguf.quants.dequantize(t.data, t.tensor_type)
            w = np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
            if self.arch in ("llama", "mistral"):
                if name.endswith("q_proj.weight"):
                    w = unpermute_qk(w, cfg.num_attention_heads)
                elif name.endswith("k_proj.weight"):
                    w = unpermute_qk(w, cfg.num_key_value_heads)
            yield name, torch.from_numpy(np.array(w, copy=True) if not w.flags.writeable else np.ascontiguousarray(w))

    def tokenizer(self) -> Tokenizer:
        model = self.get("tokenizer.ggml.model")
        tokens: list[str] = self.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError(f"{self.path} has no tokenizer in its metadata")
        types = self.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if model == "gpt2":
            merges = [tuple(m.split(" ", 1)) for m in self.get("tokenizer.ggml.merges", [])]
            tk = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
            tk.pre_tokenizer = _byte_level_pre_tokenizer(self.get("tokenizer.ggml.pre", "default"))
            tk.decoder = decoders.ByteLevel()
        elif model == "llama":
            tk = _sentencepiece_bpe(tokens, self.get("tokenizer.ggml.scores"), vocab,
                                    bool(self.get("tokenizer.ggml.add_space_prefix", True)))
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {model!r} in {self.path}")
        specials = [AddedToken(tok, special=True, normalized=False)
                    for tok, ty in zip(tokens, types) if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]
        tk.add_special_tokens(specials)

        def token(key: str) -> str | None:
            i = self.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
        if bos is not None and self.get("tokenizer.ggml.add_bos_token", model == "llama"):
            tk.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
        eos_ids = [vocab[eos]] if eos is not None else []
        eot = self.get("tokenizer.ggml.eot_token_id")
        if eot is not None and eot not in eos_ids:
            eos_ids.append(int(eot))
        return Tokenizer(tk, self.get("tokenizer.chat_template"), bos, eos, eos_ids)


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_RE), "isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "qwen2":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_RE), "isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _sentencepiece_bpe(tokens: list[str], scores, vocab: dict[str, int], add_space_prefix: bool) -> HFTokenizer:
    """SentencePiece BPE (Llama 2, Mistral): merges ranked by the merged piece's score."""
    scores = list(scores) if scores is not None else [-float(i) for i in range(len(tokens))]
    merges = []
    for piece, score in zip(tokens, scores):
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in vocab and b in vocab:
                merges.append((-score, vocab[a], vocab[b], a, b))
    merges.sort()
    tk = HFTokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], unk_token=tokens[0] if tokens else None,
                                fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tk.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    return tk
