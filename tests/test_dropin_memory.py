"""duo_fast/bench/dropin_memory.py (the per-GPU memory of a Duo training step at
the configs' scale, issue 22) against the Duo code itself: its parameter count
against models.dit.DIT built from the Duo config, its activation bytes per
token and block against the tensors autograd saves for the Duo code's own
DDiTBlock under bf16 autocast, and its count of the Duo loss' peak against the
tensors alive while DUO_BASE.nll_per_token runs forward and backward."""

from __future__ import annotations

import warnings
import weakref

import torch

import duo_codebase
from duo_codebase import K_SMALL, make_config, make_tokenizer
from duo_fast.bench import dropin_memory as M

ref, tok_dir = duo_codebase.ref, duo_codebase.tok_dir  # the shared fixtures


def _config(ref, tok_dir, **model):
    over = [f"model.{k}={v}" for k, v in model.items()]
    return make_config(ref, tok_dir, over)


def test_parameter_count_is_the_duo_dits(ref, tok_dir):
    cfg = _config(ref, tok_dir, hidden_size=768, n_blocks=12, n_heads=12, cond_dim=128)
    with torch.device("meta"):
        dit = ref.dit.DIT(cfg, vocab_size=50257)
    assert M.DIT_SMALL.params(50257) == sum(p.numel() for p in dit.parameters())
    assert 165e6 < M.DIT_SMALL.params(50257) < 175e6  # "the 170M-parameter model"


def test_activation_bytes_per_token_and_block(ref, tok_dir):
    """Bytes of the distinct tensors autograd saves for one DDiTBlock (training,
    dropout 0.1) under bf16 autocast, per token: the difference between 2 and 1
    sequences (what does not grow with the batch, the weights' bf16 copies and
    the rotary tables, cancels) is ACT_PER_BLOCK * d up to O(1) bytes per token:
    the norms' mean and rstd, the attention's logsumexp, and the per-sequence
    adaLN vectors spread over its L tokens."""
    d, L = 256, 80
    cfg = _config(ref, tok_dir, hidden_size=d, n_heads=4, cond_dim=128, n_blocks=1, dropout=0.1, length=L)
    dit = ref.dit.DIT(cfg, vocab_size=K_SMALL)
    block = dit.blocks[0].train()

    def saved_bytes(batch: int) -> int:
        x = torch.randn(batch, L, d, requires_grad=True)
        c = torch.randn(batch, 128, requires_grad=True)
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            block(x, dit.rotary_emb(x), c=c)
        return sum(saved.values())

    per_token = (saved_bytes(2) - saved_bytes(1)) / L
    assert M.ACT_PER_BLOCK * d <= per_token <= M.ACT_PER_BLOCK * d + 128, (per_token / d, per_token)


def test_duo_loss_peak(ref, tok_dir):
    """The tensors alive (created by the step, the bf16 logits themselves added)
    at the peak of log_softmax (float32, as autocast runs it) + the Duo code's
    DUO_BASE.nll_per_token, forward and backward: DUO_LOSS_PEAK bytes per logit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    K, B, L = K_SMALL, 2, 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ref.algo.DUO_BASE(make_config(ref, tok_dir), make_tokenizer(K, tok_dir))

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.now, self.peak, self.seen = 0, 0, set()

        def _gone(self, key, n):
            self.seen.discard(key)
            self.now -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                key = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else 0
                if key and key not in self.seen:
                    n = t.untyped_storage().nbytes()
                    self.seen.add(key)
                    self.now += n
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(t, self._gone, key, n)
            return out

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, K, generator=g).bfloat16().requires_grad_()
    x0, xt = torch.randint(0, K, (B, L), generator=g), torch.randint(0, K, (B, L), generator=g)
    alpha, dalpha = torch.full((B, 1), 0.5), torch.full((B, 1), -1.0)
    with Live() as live:
        loss = model.nll_per_token(logits.float().log_softmax(-1), xt, x0, alpha, dalpha)
        loss.sum().backward()
    per_logit = (live.peak + logits.numel() * 2) / logits.numel()
    assert M.DUO_LOSS_PEAK - 0.5 <= per_logit <= M.DUO_LOSS_PEAK + 0.5, per_logit


def test_the_issue_numbers():
    """The logits and their bf16 gradient at 64 x 1024 tokens per GPU: ~13 GB (issue
    22); the fused output layer's share is under a GB; it fits more sequences."""
    b = M.step_bytes(64 * 1024)
    assert b["drop-in on the logits"]["output"] == 4 * 65536 * 50257
    assert 13e9 < b["drop-in on the logits"]["output"] < 13.5e9
    assert b["drop-in, output layer fused"]["output"] < 1e9
    fit = M.largest_batch()
    assert fit["Duo code"] < fit["drop-in on the logits"] < fit["drop-in, output layer fused"]
    for v, n in fit.items():
        assert M.step_bytes(n * 1024)[v]["total"] <= M.GPU_BYTES < M.step_bytes((n + 1) * 1024)[v]["total"]
