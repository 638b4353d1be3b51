"""The sampler on synthetic logits: masks, penalties, seeds, logprobs."""
import math

import torch

from kiln.config import SamplingParams
from kiln.scheduler.request import Sequence
from kiln.workers.sampling import Sampler


def seqs(*params, outputs=()):
    out = []
    for i, p in enumerate(params):
        s = Sequence(i + 1, str(i), [5, 6], p, [0], 100)
        for t in (outputs[i] if outputs else []):
            s.token_ids.append(t)
        out.append(s)
    return out


def draws(logits_row, params, n=400):
    sampler = Sampler(torch.device("cpu"))
    got = set()
    for _ in range(n):
        tok, _ = sampler(logits_row[None].clone(), seqs(params))
        got.add(tok[0])
    return got


def test_greedy_and_temperature_zero():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 1.0, 0.0]])
    tok, lps = Sampler(torch.device("cpu"))(logits, seqs(SamplingParams(temperature=0), SamplingParams(top_k=1)))
    assert tok == [1, 0] and lps == [None, None]


def test_top_k_top_p_min_p_masks():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert draws(logits, SamplingParams(top_k=2)) == {0, 1}
    # top_p=0.7: 0.5 < 0.7, 0.5+0.3 >= 0.7, so the first two stay
    assert draws(logits, SamplingParams(top_p=0.7)) == {0, 1}
    assert draws(logits, SamplingParams(top_p=0.4)) == {0}
    # min_p=0.35: keep p >= 0.35 * 0.5 = 0.175
    assert draws(logits, SamplingParams(min_p=0.35)) == {0, 1}
    assert draws(logits, SamplingParams()) == {0, 1, 2, 3}


def test_penalties_math():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    s = seqs(p, outputs=[[0, 0, 1]])  # prompt [5, 6] is outside this tiny vocab: only outputs matter
    s[0].token_ids = [2, 0, 0, 1]
    s[0].num_prompt_tokens = 1
    out = Sampler(torch.device("cpu"))._penalize(logits, s)
    # token 0: seen, positive -> 2/2=1; count 2 -> 1 - 0.5 - 0.5 = 0
    # token 1: seen, negative -> -4; count 1 -> -4 - 0.25 - 0.5 = -4.75
    # token 2: in the prompt only -> repetition applies: 0.5; no output count
    # token 3: untouched
    assert torch.allclose(out, torch.tensor([[0.0, -4.75, 0.5, 0.5]]))


def test_min_tokens_bans_eos():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])
    tok, _ = Sampler(torch.device("cpu"))(logits, seqs(p))
    assert tok == [2]  # eos (0) and the stop token (1) are banned before min_tokens


def test_seeded_rows_ignore_batch_company():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=42)
    a = Sampler(torch.device("cpu"))
    b = Sampler(torch.device("cpu"))
    alone = [a(logits[:1].clone(), seqs(p))[0][0] for _ in range(5)]
    mixed = [b(logits.clone(), seqs(p, SamplingParams(temperature=1.0), SamplingParams(temperature=0.7)))[0][0]
             for _ in range(5)]
    assert alone == mixed


def test_logprobs_ranks():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    tok, lps = Sampler(torch.device("cpu"))(logits, seqs(SamplingParams(temperature=0, logprobs=2)))
    lp = torch.log_softmax(logits, -1)[0]
    assert tok == [1]
    assert lps[0].rank == 1 and math.isclose(lps[0].logprob, lp[1].item(), rel_tol=1e-6)
    assert [t for t, _ in lps[0].top] == [1, 2]
