"""The chunk machinery of the fused linear ops (linear_usdm_loss,
linear_distill_kl, linear_sample_step): the logits ``hidden @ weight.T + bias``
exist one chunk of rows (tokens) at a time, never for all N rows.

A *row op* maps one chunk's logits ``[C, K]`` (rows ``[s, e)`` of the flattened
tokens) to ``(value [C] float32, G = d value / d logits [C, K] or empty)``, as
the fused kernels usdm_loss and distill_kl do:
``row_op(logits, s, e, compute_grad, bufs, *tensors)`` (``bufs``: the pass's
ChunkBuffers, for GEMMs of its own). By the chain rule through
``logits = hidden @ weight.T + bias`` a chunk's G gives

    grad_hidden[s:e] = G @ weight,  grad_weight += G^T @ hidden[s:e],  grad_bias += sum of G's rows,

so per chunk one logits GEMM, one kernel call and three gradient GEMMs; peak
extra memory O(chunk_size * K), independent of N.
"""

from __future__ import annotations

import torch

from .._checks import check_same_device, check_tensor, check_vocab
from ._common import _LOGIT_DTYPES, check_no_func_transform, check_not_differentiated, first_order_only

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

REDUCTIONS = ("none", "sum", "mean")


def default_chunk_size(vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk so that one chunk's float32 logits (and their gradient)
    take about 64 MiB: large enough for efficient GEMMs, O(1) in N."""
    return max(1, min(4096, (64 << 20) // (4 * vocab_size)))


def kernel_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the kernels read them: float32 / bfloat16 / float16 natively, other
    float dtypes (float64) as float32."""
    return logits if logits.dtype in _LOGIT_DTYPES else logits.float()


def check_linear(hidden, weight, bias, names: tuple[str, str, str] = ("hidden", "weight", "bias")) -> int:
    """hidden [..., d] and weight [K, d], bias [K] or None: one floating dtype (float32,
    bfloat16, float16 or float64; checked first, so that no matmul complains about a
    tensor the user never passed) and one device; returns K. ``names``: the
    arguments' names in the caller's signature."""
    h, w, b = names
    check_tensor(hidden, h, DTYPES)
    check_tensor(weight, w, DTYPES)
    if bias is not None:
        check_tensor(bias, b, DTYPES)
    for t, name in ((weight, w), (bias, b)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"duo_fast: {name} has dtype {str(t.dtype).replace('torch.', '')}, expected {h}'s dtype "
                            f"{str(hidden.dtype).replace('torch.', '')} ({h}, {w} and {b} must have one dtype)")
    if weight.dim() != 2 or hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"duo_fast: {w} must be [K, d] with d = {h}.size(-1); got {w} {tuple(weight.shape)}, "
                         f"{h} {tuple(hidden.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"duo_fast: {b} has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    check_same_device((h, hidden), (w, weight), (b, bias))
    return check_vocab(weight.shape[0], f"{w}.size(0) (the vocabulary size)")


def check_chunk_size(chunk_size, vocab_size: int, hidden_size: int) -> int:
    if chunk_size is None:
        return default_chunk_size(vocab_size, hidden_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"duo_fast: chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"duo_fast: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    return reduction


def chunks(n: int, chunk_size: int, *, balanced: bool = False):
    """(s, e) of the row chunks [s, e) of n rows: ``chunk_size`` rows each and a
    shorter last one, or (``balanced``) as many chunks with sizes that differ by at
    most one (:func:`balanced_rows` the largest). Balanced chunks have no short
    tail: every chunk's GEMM packs the whole weight, so a tail of a few rows costs
    about as much as a full chunk and leaves threads idle in the row kernel."""
    if not balanced:
        return ((s, min(n, s + chunk_size)) for s in range(0, n, chunk_size))
    k = -(-n // chunk_size) if n > 0 else 0
    q, r = divmod(n, k) if k else (0, 0)
    return ((i * q + min(i, r), (i + 1) * q + min(i + 1, r)) for i in range(k))


def balanced_rows(n: int, chunk_size: int) -> int:
    """The largest chunk of ``chunks(n, chunk_size, balanced=True)`` (0 for n = 0)."""
    return -(-n // -(-n // chunk_size)) if n > 0 else 0


def flat_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [N, d] (a view where possible)."""
    return t.reshape(-1, t.shape[-1])


class ChunkBuffers:
    """The chunk GEMMs of one pass over the chunks, each written into a reused
    ``[rows, K]`` buffer of its own, by name: the chunk's logits
    ``hidden[s:e] @ weight.T + bias`` (``"logits"``), and a row op's own (the
    teacher's logits of linear_distill_kl); likewise a row op's gradient G
    (``like``, for the kernels' ".into" overloads). A fresh block of that size per chunk
    would be page-faulted again each time (the CPU allocator hands such blocks
    back to the OS when they are freed); a buffer lives as long as the pass.
    A result is valid until the next call with the same name; under
    torch.compile, plain out-of-place GEMMs. ``rows``: the largest chunk."""

    def __init__(self, rows: int):
        self.rows = rows
        self.reuse = rows > 0 and not torch.compiler.is_compiling()
        self.bufs: dict[str, torch.Tensor] = {}

    def _block(self, name: str, rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The first ``rows`` rows of the pass's ``[self.rows, cols]`` block ``name``,
        allocated on first use (again if asked in another dtype)."""
        buf = self.bufs.get(name)
        if buf is None or buf.dtype != dtype:
            buf = self.bufs[name] = torch.empty((self.rows, cols), dtype=dtype, device=device)
        return buf[:rows]

    def like(self, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialized ``[C, K]`` block of t's shape and device, in t's dtype or
        ``dtype`` (a row op's gradient, written by a ".into" kernel); only where
        ``reuse``."""
        return self._block(name, t.shape[0], t.shape[-1], t.dtype if dtype is None else dtype, t.device)

    def value_grad(self, op, logits: torch.Tensor, *rest, compute_grad: bool):
        """A fused (value, gradient) kernel (usdm_loss, distill_kl) on a chunk:
        ``op.default(logits, *rest, compute_grad)``, or, where the pass reuses
        blocks and a gradient is wanted, ``op.into`` writing it into the pass's
        "grad" block."""
        if compute_grad and self.reuse:
            g = self.like("grad", logits)
            return op.into(logits, *rest, g), g
        return op.default(logits, *rest, compute_grad)

    def float32(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """t as float32: t itself if it is, else a copy in a reused block."""
        if t.dtype == torch.float32:
            return t
        if not self.reuse:
            return t.float()
        return self.like(name, t, torch.float32).copy_(t)

    def linear(self, name: str, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.reuse:
            return torch.nn.functional.linear(h, weight, bias)
        out = self._block(name, h.shape[0], weight.shape[0], h.dtype, h.device)
        if bias is None:
            return torch.mm(h, weight.t(), out=out)
        return torch.addmm(bias, h, weight.t(), out=out)


def _chunk_value_grad(row_op, h2, weight, bias, s, e, tensors, bufs):
    """(value, G) of rows [s, e). The chunk's logits are float32, so G stays float32
    for the GEMMs that take it (a 16-bit G would add its rounding to grad_hidden /
    grad_weight). ``bufs``: the pass's ChunkBuffers."""
    logits = bufs.float32("logits32", bufs.linear("logits", h2[s:e], weight, bias))
    return row_op(logits, s, e, True, bufs, *tensors)


def _first_chunk_writes() -> bool:
    return not torch.compiler.is_compiling()


def _new_grads(h2, weight, bias, needs, hidden_dtype):
    """Gradient buffers (grad_hidden [N, d] in hidden_dtype, grad_weight and
    grad_bias float32), None where not needed, and the float32 weight the
    grad_hidden GEMM takes. grad_weight and grad_bias are written by the first
    chunk (_add_chunk_grads), so they start zeroed only where there is none (or
    under torch.compile, which traces the plain accumulation)."""
    need_h, need_w, need_b = needs
    new = torch.empty if _first_chunk_writes() and h2.shape[0] > 0 else torch.zeros
    grad_h = torch.empty(h2.shape, dtype=hidden_dtype, device=h2.device) if need_h else None
    grad_w = new(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = new(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b and bias is not None else None
    return grad_h, grad_w, grad_b, (weight.float() if need_h else None)


def _add_chunk_grads(g, h2, w32, grad_h, grad_w, grad_b, s, e):
    """grad_hidden[s:e] = G @ weight (w32: weight in float32), grad_weight += G^T @
    hidden[s:e], grad_bias += the sum of G's rows; each where it is not None. The
    first chunk (s = 0) writes grad_weight and grad_bias instead of adding to them
    (no pass to zero them first)."""
    if grad_h is not None:
        grad_h[s:e] = g @ w32
    first = s == 0 and _first_chunk_writes()
    if grad_w is not None:
        if first:
            torch.mm(g.t(), h2[s:e].float(), out=grad_w)
        else:
            grad_w.addmm_(g.t(), h2[s:e].float())
    if grad_b is not None:
        if first:
            torch.sum(g, 0, out=grad_b)
        else:
            grad_b += g.sum(0)


class LinearRows(torch.autograd.Function):
    """value = row_op(hidden @ weight.T + bias) per token ([N] float32), chunk by chunk.

    Forward: per chunk, the chunk's logits (GEMM, in hidden's dtype: 16-bit logits are
    read natively by the kernels) and the row op's value; nothing of size [N, K] is
    kept. Backward: per chunk, the logits are recomputed (float32), the row op gives
    G, rows are scaled by grad_output, and the three gradient GEMMs run. Works for
    any grad_output (retain_graph, torch.compile); the price is a second logits GEMM.
    Under create_graph=True the gradients are exact and raise when differentiated
    again (first_order_only: the row ops have no second derivative).
    apply(row_op, hidden, weight, bias, chunk_size, what, names, *tensors): tensors
    are the row op's extra inputs (saved for backward, never differentiated: a
    backward that needs one raises, naming it); ``what`` names the op, ``names``
    hidden, weight, bias and the tensors."""

    @staticmethod
    def forward(ctx, row_op, hidden, weight, bias, chunk_size, what, names, *tensors):
        h2 = flat_rows(hidden)
        N = h2.shape[0]
        value = torch.empty(N, dtype=torch.float32, device=hidden.device)
        bufs = ChunkBuffers(min(chunk_size, N))
        for s, e in chunks(N, chunk_size):
            value[s:e], _ = row_op(bufs.linear("logits", h2[s:e], weight, bias), s, e, False, bufs, *tensors)
        ctx.save_for_backward(hidden, weight, bias, *tensors)
        ctx.row_op, ctx.chunk_size, ctx.what, ctx.names = row_op, chunk_size, what, names
        return value

    @staticmethod
    def backward(ctx, grad_value):
        check_not_differentiated(ctx, ctx.what, {7 + i: n for i, n in enumerate(ctx.names[3:])})
        hidden, weight, bias, *tensors = ctx.saved_tensors
        with torch.no_grad():
            h2 = flat_rows(hidden)
            grad_h, grad_w, grad_b, w32 = _new_grads(h2, weight, bias, ctx.needs_input_grad[1:4], hidden.dtype)
            bufs = ChunkBuffers(min(ctx.chunk_size, h2.shape[0]))
            for s, e in chunks(h2.shape[0], ctx.chunk_size):
                _, g = _chunk_value_grad(ctx.row_op, h2, weight, bias, s, e, tensors, bufs)
                g.mul_(grad_value[s:e].unsqueeze(-1))
                _add_chunk_grads(g, h2, w32, grad_h, grad_w, grad_b, s, e)
            grads = (
                grad_h.view(hidden.shape) if grad_h is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None,
            )
        anchor = next((t for t in (hidden, weight, bias) if t is not None and t.requires_grad), None)
        wrt = f"{ctx.names[0]}, {ctx.names[1]} and {ctx.names[2]}"
        return (None, *first_order_only(ctx.what, wrt, anchor, *grads),
                None, None, None) + (None,) * len(tensors)


class LinearRowsReduced(torch.autograd.Function):
    """sum (or mean) over tokens of row_op(hidden @ weight.T + bias), chunk by chunk,
    with the gradients computed in the forward (as Liger's fused linear cross
    entropy): a reduced value's grad_output is one scalar c, so per chunk the row
    op's G (scaled by 1/N for the mean) goes straight into the three gradient GEMMs,
    and backward only multiplies them by c: one logits GEMM and one kernel call per
    chunk instead of two of each. Holds the float32 gradients of hidden and weight
    from forward to backward; one backward only, and not under create_graph=True.
    apply(row_op, hidden, weight, bias, chunk_size, mean, what, names, *tensors):
    ``what`` names the op in the errors, ``names`` its extra tensors."""

    @staticmethod
    def forward(ctx, row_op, hidden, weight, bias, chunk_size, mean, what, names, *tensors):
        h2 = flat_rows(hidden)
        N = h2.shape[0]
        grad_h, grad_w, grad_b, w32 = _new_grads(h2, weight, bias, ctx.needs_input_grad[1:4], torch.float32)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        bufs = ChunkBuffers(min(chunk_size, N))
        for s, e in chunks(N, chunk_size):
            value, g = _chunk_value_grad(row_op, h2, weight, bias, s, e, tensors, bufs)
            total += value.sum(dtype=torch.float64)
            if mean:
                g.div_(N)
            _add_chunk_grads(g, h2, w32, grad_h, grad_w, grad_b, s, e)
        ctx.grads, ctx.what, ctx.names, ctx.n_tensors = (grad_h, grad_w, grad_b), what, names, len(tensors)
        ctx.meta = (hidden.shape, hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return (total / N if mean else total).float()

    @staticmethod
    def backward(ctx, grad_value):
        check_not_differentiated(ctx, ctx.what, {8 + i: n for i, n in enumerate(ctx.names[3:])})
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"duo_fast: {ctx.what}(..., reduction='sum' or 'mean') computes its gradients in the forward: "
                "expected a backward without create_graph=True, got create_graph=True. Use reduction='none' and "
                "reduce the per-token values: its gradients can be used under create_graph=True (differentiating "
                "them again raises: the op has no second-order gradient)"
            )
        if ctx.grads is None:
            raise RuntimeError(f"duo_fast: {ctx.what}(..., reduction=...) supports a single backward (its gradients "
                               "were computed in the forward); use reduction='none' for retain_graph=True")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        shape, h_dtype, w_dtype, b_dtype = ctx.meta
        c = grad_value.float()  # a 0-dim tensor: no host read (no CUDA sync)
        return (
            None,
            grad_h.mul_(c).to(h_dtype).view(shape) if grad_h is not None else None,
            grad_w.mul_(c).to(w_dtype) if grad_w is not None else None,
            grad_b.mul_(c).to(b_dtype) if grad_b is not None else None,
            None, None, None, None,
        ) + (None,) * ctx.n_tensors


def linear_rows(what: str, row_op, hidden, weight, bias, tensors: tuple, *, chunk_size: int, reduction: str,
                names: tuple[str, ...]):
    """row_op over the chunks of hidden @ weight.T + bias, reduced: ``[...]`` per
    token (hidden's leading shape) for "none", a 0-dim float32 for "sum" / "mean".
    Where a gradient is wanted and the value is reduced, the gradients are computed
    in the forward (LinearRowsReduced), except inside torch.compile (the graph is
    traced functionally: LinearRows, then the reduction; the same values).
    ``names``: the names of hidden, weight, bias and ``tensors`` in the op's
    signature (for the errors of a second-order backward, and of a backward that
    needs a gradient w.r.t. one of ``tensors``)."""
    check_no_func_transform(what, hidden, weight, bias, *tensors)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if reduction != "none" and needs_grad and not torch.compiler.is_compiling():
        return LinearRowsReduced.apply(row_op, hidden, weight, bias, chunk_size, reduction == "mean", what, names,
                                       *tensors)
    value = LinearRows.apply(row_op, hidden, weight, bias, chunk_size, what, names, *tensors).view(hidden.shape[:-1])
    return value if reduction == "none" else value.sum() if reduction == "sum" else value.mean()
