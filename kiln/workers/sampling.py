"""Turn a step's logits into tokens: penalties, temperature, top-k/p, min-p, seeds.

All rows are processed together. Sampling uses the exponential-race form
(argmax of p / E with E ~ Exp(1)), so a seeded row draws its noise from its
own generator and gets the same tokens whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.kernels.argmax import argmax
from kiln.scheduler.request import Sequence


@dataclass
class TokenLogprobs:
    logprob: float  # of the sampled token, under the model's distribution
    rank: int  # 1 = most likely
    top: list[tuple[int, float]]  # the top-N (token id, logprob)


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.generators: dict[int, torch.Generator] = {}

    def release(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator:
        g = self.generators.get(seq.seq_id)
        if g is None:
            # Each of a request's n samples gets its own stream.
            seed = (seq.params.seed * 1_000_003 + seq.index) & 0x7FFF_FFFF_FFFF_FFFF
            g = self.generators[seq.seq_id] = torch.Generator(device=self.device).manual_seed(seed)
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None]]:
        return self.sample(logits, seqs).result()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> "Sampled":
        """Launch a step's sampling on the device; nothing waits for it until `Sampled.result()`.

        Penalties read each sequence's output tokens, so their sequences must hold no placeholder.
        """
        params = [s.params for s in seqs]
        n_lp = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if n_lp is not None else None
        logits = self._penalize(logits, seqs)

        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens = argmax(logits)
        else:
            tokens = self._sample(logits, seqs, greedy)
        lp = None
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0]
            ranks = (raw_logprobs > chosen[:, None]).sum(dim=-1) + 1
            top_v, top_i = raw_logprobs.topk(max(n_lp, 1), dim=-1)
            lp = [chosen, ranks, top_v, top_i]
        return Sampled(tokens, lp, params)

    def _penalize(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        ps = [s.params for s in seqs]
        need_min = [s.num_output_tokens < s.params.min_tokens for s in seqs]
        has_pen = any(p.has_penalties for p in ps)
        if not has_pen and not any(need_min):
            return logits
        logits = logits.clone()
        dev, V = logits.device, logits.shape[1]
        if has_pen:
            rows = len(seqs)
            out_counts = torch.zeros(rows, V, dtype=torch.float32, device=dev)
            seen = torch.zeros(rows, V, dtype=torch.bool, device=dev)
            for i, s in enumerate(seqs):
                out = s.output_token_ids
                if out:
                    out_counts[i].index_add_(0, torch.tensor(out, device=dev),
                                             torch.ones(len(out), device=dev))
                if s.params.repetition_penalty != 1:
                    seen[i, torch.tensor(s.token_ids, device=dev)] = True
            rep = _to_device([p.repetition_penalty for p in ps], torch.float32, dev)[:, None]
            # HF / vLLM: shrink positive logits, grow negative ones, for every token seen so far.
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalized, logits)
            pres = _to_device([p.presence_penalty for p in ps], torch.float32, dev)[:, None]
            freq = _to_device([p.frequency_penalty for p in ps], torch.float32, dev)[:, None]
            logits -= freq * out_counts + pres * (out_counts > 0)
        for i, s in enumerate(seqs):
            if need_min[i]:
                banned = list(s.eos_token_ids) + list(s.params.stop_token_ids)
                if banned:
                    logits[i, _to_device(banned, torch.int64, dev)] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        ps = [s.params for s in seqs]
        dev = logits.device
        best = argmax(logits)
        temp = _to_device([1.0 if g else p.temperature for p, g in zip(ps, greedy)], torch.float32, dev)
        logits = logits / temp[:, None]
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in ps):
            logits = self._truncate(logits, ps)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        seeded = [i for i, s in enumerate(seqs) if s.params.seed is not None and not greedy[i]]
        if len(seeded) < len(seqs):
            noise.exponential_()
        for i in seeded:
            noise[i].exponential_(generator=self._generator(seqs[i]))
        sampled = argmax(probs / noise)
        return torch.where(_to_device(greedy, torch.bool, dev), best, sampled)

    @staticmethod
    def _truncate(logits: torch.Tensor, ps: list) -> torch.Tensor:
        dev, V = logits.device, logits.shape[1]
        top_k = _to_device([p.top_k if p.top_k > 0 else V for p in ps], torch.int64, dev)
        top_p = _to_device([p.top_p for p in ps], torch.float32, dev)
        min_p = _to_device([p.min_p for p in ps], torch.float32, dev)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(V, device=dev)[None, :]
        drop = ranks >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        drop |= probs < min_p[:, None] * probs[:, :1]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without a synchronizing copy (keeps async scheduling async)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class Sampled:
    """One step's sampled tokens (and logprobs) on the device, copied to the host in the background."""

    def __init__(self, tokens: torch.Tensor, lp: list[torch.Tensor] | None, params: list) -> None:
        self.tokens = tokens  # on the device: the next step's placeholders are filled from it
        self.params = params
        tensors = [tokens] + (lp or [])
        self._event = None
        if tokens.is_cuda:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            tensors = host
        self._host = tensors

    def result(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Wait for the copy; the tokens as a list, with each row's TokenLogprobs (None when not asked)."""
        if self._event is not None:
            self._event.synchronize()
        tokens = self._host[0].tolist()
        if len(self._host) == 1:
            return tokens, [None] * len(tokens)
        chosen, ranks, top_v, top_i = (t.tolist() for t in self._host[1:])
        out: list[TokenLogprobs | None] = []
        for i, p in enumerate(self.params):
            if p.logprobs is None:
                out.append(None)
                continue
            k = p.logprobs
            out.append(TokenLogprobs(chosen[i], ranks[i], list(zip(top_i[i][:k], top_v[i][:k]))))
        return tokens, out
