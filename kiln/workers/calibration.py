"""Calibration data and a layer-by-layer run of the model over it (for quantize.py).

The calibration text (kiln/data/calibration.txt; the evaluation text is a
different one) is cut into a few sequences, so that several tokens sit at
position 0: in Llama-family models that first token becomes an attention sink
with a near-constant key in every layer, and the FP8 KV scales and the
Hessians should see it more than once.

`LayerRunner` holds the calibration batch's hidden states between decoder
layers and runs one layer at a time, so a pass can look at a layer's inputs,
quantize the layer, and feed the next layer what the quantized one produces
(GPTQ's sequential scheme). Only one layer's activations and one layer's KV
cache exist at a time, so an 8B model calibrates in a few hundred MiB.
"""
from __future__ import annotations

import os
from collections import defaultdict

import torch

from kiln.kernels.attention import AttentionMetadata
from kiln.kernels.rope import apply_rope_ref

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
SEQ_LEN = 512  # calibration sequence length: 2048 tokens make 4 sequences, 4 attention sinks
ROWS_KEPT = 256  # input rows kept per linear for the AWQ / smoothing scale search
_BLOCK = 16  # scratch KV cache block size


def calibration_text() -> str:
    with open(os.path.join(DATA, "calibration.txt"), encoding="utf-8") as f:
        return f.read()


def calibration_tokens(tokenizer, vocab_size: int, n: int, use_text: bool, seed: int = 0) -> list[int]:
    """Built-in text through the model's tokenizer, or random ids (random weights have no language)."""
    if use_text and tokenizer is not None:
        ids = tokenizer.encode(calibration_text())
        return (ids * (n // max(len(ids), 1) + 1))[:n]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=g).tolist()


class LayerRunner:
    """The calibration batch (sequences of `seq_len` tokens), advanced one decoder layer at a time."""

    @torch.no_grad()
    def __init__(self, model, tokens: list[int], dtype: torch.dtype, device: torch.device,
                 seq_len: int = SEQ_LEN) -> None:
        L = max(1, min(seq_len, len(tokens), model.cos_sin.shape[0]))  # within the rotary table
        B = max(1, len(tokens) // L)
        nblk = -(-L // _BLOCK)
        attn = model.layers[0].self_attn
        self.model, self.seq_len, self.num_seqs = model, L, B
        self.positions = torch.arange(L, device=device).repeat(B)
        tables = torch.arange(B * nblk, dtype=torch.int32, device=device).view(B, nblk)
        slots = (tables[:, :, None].long() * _BLOCK + torch.arange(_BLOCK, device=device)).view(B, -1)[:, :L]
        self.meta = AttentionMetadata(
            slot_mapping=slots.reshape(-1), block_tables=tables,
            query_start_loc=torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device),
            seq_lens=torch.full((B,), L, dtype=torch.int32, device=device),
            num_decodes=B if L == 1 else 0, max_query_len=L, max_seq_len=L)
        # One layer's cache, reused by every layer (each pass rewrites the slots it reads).
        self.cache = torch.zeros(2, B * nblk, _BLOCK, attn.num_kv_heads, attn.head_dim, dtype=dtype, device=device)
        self.hidden = model.embed_tokens(torch.tensor(tokens[:B * L], device=device))
        self.residual: torch.Tensor | None = None

    @torch.no_grad()
    def run(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (hidden, residual) outputs on the current inputs, which stay as they are
        (the layer adds into its residual in place, and on layer 0 the residual is the input)."""
        res = None if self.residual is None else self.residual.clone()
        return layer(self.positions, self.hidden.clone(), res, self.model.cos_sin,
                     (self.cache[0], self.cache[1]), self.meta)

    def advance(self, layer) -> None:
        """Move on to the next layer, whose inputs are what `layer` (as it is now) produces."""
        self.hidden, self.residual = self.run(layer)


class InputStats:
    """What a pass sees at the inputs of some linears: the Hessian proxy H = X^T X (GPTQ), and
    mean |x| per channel with a sample of rows (AWQ / smoothing scale search)."""

    def __init__(self, modules: dict[str, torch.nn.Module], hessian: bool, rows: bool) -> None:
        self.H: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = defaultdict(int)
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._want_h, self._want_rows = hessian, rows
        self._hooks = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(_, args):
            x = args[0].detach().float()
            self.count[name] += x.shape[0]
            if self._want_h:
                xx = x.T @ x
                self.H[name] = self.H[name] + xx if name in self.H else xx
            if self._want_rows:
                s = x.abs().sum(dim=0)
                self.abs_sum[name] = self.abs_sum[name] + s if name in self.abs_sum else s
                if sum(r.shape[0] for r in self.rows[name]) < ROWS_KEPT:
                    self.rows[name].append(x[::max(1, x.shape[0] // ROWS_KEPT)][:ROWS_KEPT])
        return hook

    def mean_abs(self, name: str) -> torch.Tensor:
        return self.abs_sum[name] / max(self.count[name], 1)

    def sample(self, name: str) -> torch.Tensor:
        return torch.cat(self.rows[name])

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


class AttentionCapture:
    """q, k (after RoPE) and v of one attention layer in a pass, as [seqs, heads, len, head_dim]."""

    def __init__(self, attn, runner: LayerRunner) -> None:
        self.attn, self.runner = attn, runner
        self.q = self.k = self.v = None
        self._hook = attn.qkv_proj.register_forward_hook(self._capture)

    def _capture(self, _, __, out) -> None:
        a, r = self.attn, self.runner
        q, k, v = (t.float() for t in out.split(a.sizes, dim=-1))
        T = q.shape[0]

        def heads(x: torch.Tensor, h: int, rope: bool) -> torch.Tensor:
            x = x.reshape(T, h, a.head_dim)
            if rope:
                x = apply_rope_ref(x, r.positions, r.model.cos_sin)
            return x.view(r.num_seqs, r.seq_len, h, a.head_dim).transpose(1, 2)

        self.q, self.k, self.v = heads(q, a.num_heads, True), heads(k, a.num_kv_heads, True), \
            heads(v.clone(), a.num_kv_heads, False)
        self._hook.remove()
