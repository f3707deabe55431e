"""Thin wrappers over the torch.ops.duo_fast custom ops: argument checks, fake
(meta) kernels for torch.compile / FakeTensor tracing, and autograd formulas.

The kernels themselves are C++ (csrc/cpu) and CUDA (csrc/cuda); the schemas are
in csrc/registration.cpp. Every wrapper dispatches on the device of its tensors.

What is checked where. Types, shapes, devices and Python scalars (kappa,
temperature, top_p, k, vocab_size, ...) are checked here and again by the C++
bindings, on every device, before anything runs. Values inside tensors (token
ids in [0, K), alpha in (0, 1), dalpha <= 0, 0 <= alpha_t <= alpha_s <= 1 with
alpha_t < 1, gamma finite, inv_tau finite and > 0): for CPU tensors by the C++
bindings, raising at once with the argument's name; for CUDA tensors reading
them on the host would wait for the GPU at every call (and break CUDA graph
capture), so the CUDA kernels check them on the device: an invalid row or token
is never used to index memory, gets unspecified outputs (NaN where floating,
ids in range), and the next duo_fast CUDA call raises a RuntimeError naming the
argument (csrc/include/duo_fast/device_check.h). DUO_FAST_CUDA_SYNC_CHECKS=1
runs the host checks for CUDA tensors too (synchronizing, for debugging). No
CUDA op of this module reads a CUDA tensor on the host: with an explicit
``seed`` the ops can be captured in a CUDA graph (torch.compile
mode="reduce-overhead"); a key drawn from a generator is read from the
generator's host state (duo_fast/_random.py).

Bad values: one policy for every op (tests/README.md has the table).

* Levels (gamma, gamma_s, alpha, dalpha, alpha_t, alpha_s, inv_tau) are never
  NaN: a NaN or out-of-range level raises, naming the argument, in every op
  that takes one (gamma_to_alpha included). They come from a schedule, so a NaN
  is a bug upstream, and every output drawn from it would look plausible.
* Model values into an op with floating outputs (logits of usdm_loss,
  linear_usdm_loss and distill_kl; hidden, weight, bias; the embedding of the
  curriculum ops) propagate: a row with a NaN or +inf logit, or with no finite
  logit (all -inf), gives a NaN loss / KL and a NaN gradient row, a NaN
  embedding row gives NaN in the h that read it, as torch's own losses do. No
  error, on purpose: mixed-precision training relies on non-finite losses
  reaching the GradScaler (which skips the step), and the NaN is a trace.
* Model values into an op that samples (logits of sample_step and posterior)
  must form a distribution in every row: a row with NaN, +inf or no finite
  logit raises, naming logits (as torch.multinomial does). A single -inf
  entry is probability 0 and always fine.
* Where a value error is found: CPU tensors at the call, before any output is
  returned. CUDA tensors on the device (no synchronization): the invalid row or
  token gets NaN (floating outputs) or an in-range id (sample_step keeps z
  there), and the next duo_fast CUDA call raises, naming the argument;
  :func:`check_device_errors` waits for the device and raises at once
  (generate calls it before returning).
* Token ids are int64 or int32 (converted; integer outputs come back in the
  dtype of the input ids), in [0, K).

torch.compile, threads, checkpoint (tests/test_compile.py, test_lifetime.py):
every op traces with fullgraph=True (fake kernels here; the seed arguments of
the schemas are SymInt, so a CPU key drawn from the default generator inside a
compiled function stays in the graph and each call draws a fresh one; with
dynamic=True a changing N does not recompile). On CUDA, inside a fullgraph
compile, pass seed= (the key is read from the CUDA generator's host state).
Calls from several Python threads give the results of serial calls (the ops
release the GIL; per-K schedule tables are built once under a lock).
torch.utils.checkpoint recomputes the same noise with seed= or with the
default generator (preserve_rng_state=True, its default), not with an explicit
generator= (see curriculum_embed).
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from ._checks import check_real, check_same_device, check_tensor, check_vocab, per_token_level, token_ids
from ._linear_chunks import check_chunk_size, check_linear, check_reduction, linear_rows
from ._random import philox_seed

_FLOAT_LEVELS = (torch.float32, torch.float64)
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------
# SPEC section 1: the diffusion transformation operator
# --------------------------------------------------------------------------------------


def gamma_to_alpha(gamma: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform-state signal level of a Gaussian log-noise level (SPEC section 1).

    Returns ``(alpha, dalpha_dgamma)``, same shape and dtype (float32 or float64)
    as ``gamma``, for vocabulary size ``K = vocab_size`` (2 <= K <= 2^24):

        pt    = int phi(u - nu) Phi(u)^(K-1) du,  nu = exp(-gamma / 2)
        alpha = (K pt - 1) / (K - 1)

    Evaluated from a per-K table of Chebyshev expansions of log(alpha),
    log(1 - alpha) and log(-dalpha/dgamma) on [-9, 20] (built once per K and
    process by adaptive Gauss-Legendre quadrature, ~0.1 s; no data file), with
    the exact limits below -9 (alpha = 1, dalpha = 0: both differ from those by
    less than 1e-300) and a second-order expansion in nu above 20. In float64:
    |alpha - exact| < 1e-14, and alpha, 1 - alpha and dalpha are each within
    1e-7 relative of the exact values (dalpha values below ~1e-300 flush to 0).
    -inf gives (1, 0) and +inf gives (0, 0). A NaN gamma raises (a level is
    never NaN; on CUDA its outputs are NaN and the next duo_fast CUDA call
    raises, see the module's "Bad values").

    Not differentiable (a schedule, not a model output): for d alpha / d t use
    ``dalpha_dgamma * dgamma_dt``.
    """
    check_tensor(gamma, "gamma", _FLOAT_LEVELS)
    check_vocab(vocab_size)
    return torch.ops.duo_fast.gamma_to_alpha.default(gamma, vocab_size)


@torch.library.register_fake("duo_fast::gamma_to_alpha")
def _gamma_to_alpha_fake(gamma, vocab_size):
    torch._check(gamma.dtype in _FLOAT_LEVELS, lambda: f"duo_fast: gamma has dtype {gamma.dtype}")
    return gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape)


# --------------------------------------------------------------------------------------
# SPEC sections 2a, 2b: exact O(1) sampling of the uniform-state latent
# --------------------------------------------------------------------------------------


def sample_zt(
    x0: torch.Tensor,
    gamma: torch.Tensor,
    vocab_size: int,
    *,
    gamma_s: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
):
    """The uniform-state latent ``z_t = argmax(a~ onehot(x0) + s~ eps)`` without
    the K noises (SPEC 2a), or the coupled pair ``(z_t, z_s)`` of two levels
    sharing the same eps (SPEC 2b, consistency distillation).

    ``x0``: ``[B, L]`` int64 or int32 ids in ``[0, vocab_size)`` (outputs in
    x0's dtype); ``gamma`` (and ``gamma_s``): Gaussian log-noise levels per row
    ``[B]`` / ``[B, 1]`` or per token ``[B, L]``, any float dtype (used in
    float64); -inf gives x0 and +inf the uniform law, NaN raises (module
    docstring, "Bad values"). Exact law:
    ``P(z_t = x0) = pt(gamma)`` (so ``alpha = gamma_to_alpha(gamma)[0]``),
    otherwise uniform over the other ids. O(1) work and no memory per token
    beyond the output. Randomness per ``duo_fast._random``: with ``seed`` the
    outputs are identical on CPU (any thread count) and CUDA, except where
    ``nu + eps_x`` and the max of the other noises tie to rounding.
    Not differentiable (integer outputs).
    """
    ids = token_ids(x0, "x0")
    check_vocab(vocab_size)
    g_t = per_token_level(gamma, "gamma", x0)
    g_s = None if gamma_s is None else per_token_level(gamma_s, "gamma_s", x0)
    key = philox_seed(x0.device, generator, seed)
    z_t, z_s = torch.ops.duo_fast.sample_zt.default(ids, g_t, g_s, vocab_size, key, 0)
    z_t, z_s = z_t.to(x0.dtype), z_s.to(x0.dtype)
    return z_t if gamma_s is None else (z_t, z_s)


@torch.library.register_fake("duo_fast::sample_zt")
def _sample_zt_fake(x0, gamma_t, gamma_s, vocab_size, seed, offset):
    z_s = x0.new_empty(x0.shape) if gamma_s is not None else x0.new_empty((0,))
    return x0.new_empty(x0.shape), z_s


# --------------------------------------------------------------------------------------
# SPEC section 3: distillation KLs
# --------------------------------------------------------------------------------------

_DIRECTIONS = {"bwd": 0, "fwd": 1}


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, direction: str = "bwd", *, inplace_grad: bool = False
) -> torch.Tensor:
    """Per-token KL between the student's and the teacher's softmax (SPEC 3):
    ``direction="bwd"``: KL(pS || pT); ``"fwd"``: KL(pT || pS). Logits
    ``[..., K]`` float32, bfloat16 or float16, each law its own dtype, read
    natively (no float32 copy; math in float64 on CPU, float32 on CUDA); returns
    ``[...]`` float32, the gradient in the student's dtype. Differentiable w.r.t. ``student_logits`` only; the
    gradient is computed in the same pass as the KL when the student requires
    grad (no ``[N, K]`` temporaries besides the gradient itself).

    Memory, as :func:`usdm_loss`: by default backward returns ``gradient *
    grad_output`` out of place (two ``[N, K]`` tensors at its peak; with 16-bit
    logits the product is float32, cast back by autograd: 5x the student's
    bytes); ``inplace_grad=True`` hands the forward's gradient buffer to autograd,
    scaled in place in its own dtype (the same bits): peak extra memory the
    gradient alone, one backward only, ignored inside ``torch.compile``.

    Masked vocabularies: a ``-inf`` logit is probability 0 with ``0 log 0 = 0``,
    so an entry that is 0 in the weighting law (the student for ``"bwd"``, the
    teacher for ``"fwd"``) adds nothing and its gradient is 0; a 0 in the other
    law where the weighting law is positive gives ``+inf`` (for ``"bwd"``: a
    teacher 0 where the student is positive), as the math says, and the
    gradient of an infinite ``"bwd"`` KL is not finite.

    Bad values propagate (module docstring, "Bad values"): a row of either
    logits with a NaN or +inf entry, or entirely ``-inf``, gives a NaN KL and
    a NaN gradient row, as ``torch.nn.functional.kl_div`` of log_softmax does;
    no error (AMP's GradScaler skips such steps)."""
    check_tensor(student_logits, "student_logits", _LOGIT_DTYPES)
    check_tensor(teacher_logits, "teacher_logits", _LOGIT_DTYPES)
    if direction not in _DIRECTIONS:
        raise ValueError(f"duo_fast: direction must be 'bwd' or 'fwd', got {direction!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"duo_fast: teacher_logits has shape {tuple(teacher_logits.shape)}, expected student_logits' shape {tuple(student_logits.shape)}"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 2:
        raise ValueError(f"duo_fast: student_logits must be [..., K] with K >= 2, got shape {tuple(student_logits.shape)}")
    check_same_device(student_logits, "student_logits", teacher_logits, "teacher_logits")
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if inplace_grad and compute_grad and not torch.compiler.is_compiling():
        return _FusedGradInplace.apply("distill_kl", torch.ops.duo_fast.distill_kl.default, student_logits,
                                       teacher_logits.detach(), _DIRECTIONS[direction])
    kl, _ = torch.ops.duo_fast.distill_kl.default(
        student_logits, teacher_logits.detach(), _DIRECTIONS[direction], compute_grad
    )
    return kl


def _fused_grad_fake(logits, compute_grad):
    """Fake outputs of the (value, d value / d logits) ops; mirrors csrc/fused_outputs.h."""
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32), grad


@torch.library.register_fake("duo_fast::distill_kl")
def _distill_kl_fake(student, teacher, direction, compute_grad):
    return _fused_grad_fake(student, compute_grad)


def _fused_grad_setup_context(ctx, inputs, output):
    """Shared by the ops that return (value, d value / d input) with the
    gradient computed in the forward (compute_grad is their last argument)."""
    ctx.compute_grad = inputs[-1]
    ctx.save_for_backward(output[1])
    # The second output is a by-product, never differentiated: do not make
    # autograd allocate an [N, K] zero gradient for it.
    ctx.set_materialize_grads(False)


def _fused_grad_backward(ctx, grad_value, n_inputs):
    """grad_input = saved gradient * grad_output (out of place: scaling the saved
    tensor in place breaks gradcheck's repeated backward and AOT partitioning;
    so backward holds two [N, K] tensors at its peak)."""
    (grad,) = ctx.saved_tensors
    if not ctx.compute_grad:
        raise RuntimeError("duo_fast: the op was called with compute_grad=False; call it with compute_grad=True to differentiate")
    if grad_value is None:
        return (None,) * n_inputs
    return (grad * grad_value.unsqueeze(-1),) + (None,) * (n_inputs - 1)


def _distill_kl_backward(ctx, grad_kl, grad_grad):
    return _fused_grad_backward(ctx, grad_kl, 4)


torch.library.register_autograd("duo_fast::distill_kl", _distill_kl_backward, setup_context=_fused_grad_setup_context)


# --------------------------------------------------------------------------------------
# SPEC section 3: the uniform-state diffusion loss
# --------------------------------------------------------------------------------------


def _check_ids_like(t: torch.Tensor, t_name: str, z: torch.Tensor, x0: torch.Tensor | None = None) -> None:
    """z (and x0) must have t's leading shape ([..., K] or [..., d]) and device."""
    lead = tuple(t.shape[:-1])
    for ids, name in ((z, "z"), (x0, "x0")):
        if ids is None:
            continue
        if tuple(ids.shape) != lead:
            raise ValueError(f"duo_fast: {name} has shape {tuple(ids.shape)}, expected the leading shape of {t_name}, {lead}")
        check_same_device(t, t_name, ids, name)


def usdm_loss(
    logits: torch.Tensor,
    z: torch.Tensor,
    x0: torch.Tensor,
    alpha: torch.Tensor,
    dalpha: torch.Tensor,
    *,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """Per-token uniform-state diffusion NELBO (SPEC 3; ``DUO_BASE.nll_per_token``
    on ``log_softmax(logits)``) from raw logits, fused: no ``[N, K]`` temporary.

    ``logits``: ``[B, L, K]`` float32, bfloat16 or float16, read natively (math
    in float32; no upcast copy) with the gradient written in the logits' dtype
    (each entry computed in float32 and rounded once); ``z``, ``x0``: ``[B, L]`` int64 (or int32) ids in
    ``[0, K)``; ``alpha`` in (0, 1) and ``dalpha`` <= 0 (d alpha / d t) per row
    (``[B]``, ``[B, 1]``) or per token (``[B, L]``). Returns ``[B, L]`` float32.
    Differentiable w.r.t. ``logits``: when they require grad the gradient is
    computed in the same call (three sweeps over each row: log-sum-exp,
    reductions, gradient) and scaled by ``grad_output`` in backward, so the only
    ``[N, K]`` memory is the gradient itself. The loss is evaluated in a form
    where every term vanishes for a perfect model (see csrc/include/duo_fast/
    usdm_loss.h), so small losses keep their relative accuracy.

    Masked vocabularies: a ``-inf`` logit is probability 0 (``0 log 0 = 0``):
    it stays in the vocabulary size ``K`` of the uniform prior, its model
    marginal is ``1 - alpha``, its gradient is 0, and ``z`` or ``x0`` may be
    such an id (the loss stays finite).

    Bad values (module docstring): ``alpha`` / ``dalpha`` out of range or NaN
    raise. Logits propagate: a row with a NaN or +inf logit, or entirely
    ``-inf``, gives a NaN loss and a NaN gradient row (as
    ``log_softmax``-based losses do), no error (AMP's GradScaler skips such
    steps).

    Memory: by default backward returns ``gradient * grad_output`` out of place,
    so its peak holds two ``[N, K]`` tensors (the op stays a plain custom op:
    opcheck, gradcheck, retain_graph, torch.compile). ``inplace_grad=True``
    hands the forward's gradient buffer to autograd, scaled in place: peak extra
    memory is the gradient alone (1x the logits' bytes, for every dtype), but backward can run
    only once. Inside ``torch.compile`` ``inplace_grad`` is ignored (the compiled
    graph plans its buffers itself; the values are the same).
    """
    check_tensor(logits, "logits", _LOGIT_DTYPES)
    z, x0 = token_ids(z, "z"), token_ids(x0, "x0")
    if logits.dim() < 2:
        raise ValueError(f"duo_fast: logits must be [..., K], got shape {tuple(logits.shape)}")
    check_vocab(logits.shape[-1], "logits.size(-1) (the vocabulary size)")
    _check_ids_like(logits, "logits", z, x0)
    a = per_token_level(alpha, "alpha", z, "z")
    d = per_token_level(dalpha, "dalpha", z, "z")
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    # Inside torch.compile the graph is traced functionally and plans its own buffers:
    # a buffer handed over between forward and backward cannot be traced, so there the
    # op is the plain custom op (same values).
    if inplace_grad and compute_grad and not torch.compiler.is_compiling():
        return _FusedGradInplace.apply("usdm_loss", torch.ops.duo_fast.usdm_loss.default, logits, z, x0, a, d)
    loss, _ = torch.ops.duo_fast.usdm_loss.default(logits, z, x0, a, d, compute_grad)
    return loss


class _FusedGradInplace(torch.autograd.Function):
    """A fused (value, gradient) op (usdm_loss, distill_kl) with the lowest memory:
    the gradient computed in the forward is handed to autograd as the gradient
    itself (scaled in place by grad_output, skipped when grad_output is a broadcast
    1, e.g. after .sum()), so no second [N, K] tensor ever exists. The price:
    backward can run only once. apply(name, op, input, *rest): op(input, *rest,
    True) -> (value, gradient w.r.t. input)."""

    @staticmethod
    def forward(ctx, name, op, inp, *rest):
        value, grad = op(inp, *rest, True)
        ctx.grad = grad  # not save_for_backward: backward gives this very tensor away
        ctx.name, ctx.n_rest = name, len(rest)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                f"duo_fast: {ctx.name}(..., inplace_grad=True) supports a single backward (its gradient buffer was "
                "handed to autograd); use inplace_grad=False for retain_graph / double backward"
            )
        ctx.grad = None
        # Reading the value would synchronize on CUDA: there the scale is always applied.
        ones = grad_value.device.type == "cpu" and all(s == 0 for s in grad_value.stride()) and bool(grad_value.reshape(-1)[0] == 1)
        if not ones:
            # in place in grad's dtype, the product taken in float32: a 16-bit gradient is
            # rounded once more, not grad_output first (found by the fuzzer: bf16 logits).
            # torch's in-place 16-bit x float32 product makes float32 temporaries of the
            # operand's size (measured on CPU: 4x the bf16 bytes), so a 16-bit gradient is
            # scaled by rows through one float32 buffer of 1 MiB (64 MiB on CUDA: fewer
            # launches): the same bits, O(K) extra memory.
            if grad.dtype == torch.float32:
                grad.mul_(grad_value.unsqueeze(-1))
            else:
                g2, v = grad.view(-1, grad.shape[-1]), grad_value.reshape(-1, 1)
                step = max(1, ((64 << 20) if grad.is_cuda else (1 << 20)) // (4 * g2.shape[1]))
                tmp = g2.new_empty((min(step, g2.shape[0]), g2.shape[1]), dtype=torch.float32)
                for i in range(0, g2.shape[0], step):
                    rows = g2[i:i + step]
                    t = tmp[:rows.shape[0]]
                    torch.mul(rows, v[i:i + step], out=t)
                    rows.copy_(t)
        return (None, None, grad) + (None,) * ctx.n_rest


@torch.library.register_fake("duo_fast::usdm_loss")
def _usdm_loss_fake(logits, z, x0, alpha, dalpha, compute_grad):
    return _fused_grad_fake(logits, compute_grad)


def _usdm_loss_backward(ctx, grad_loss, grad_grad):
    return _fused_grad_backward(ctx, grad_loss, 6)


torch.library.register_autograd("duo_fast::usdm_loss", _usdm_loss_backward, setup_context=_fused_grad_setup_context)


# --------------------------------------------------------------------------------------
# SPEC section 3: fused linear + loss (full logits never exist)
# --------------------------------------------------------------------------------------


def _usdm_rows(logits, s, e, compute_grad, z, x0, alpha, dalpha):
    """The row op of linear_usdm_loss (duo_fast/_linear_chunks.py): tokens [s, e)."""
    return torch.ops.duo_fast.usdm_loss.default(logits, z[s:e], x0[s:e], alpha[s:e], dalpha[s:e], compute_grad)


def linear_usdm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor,
    x0: torch.Tensor,
    alpha: torch.Tensor,
    dalpha: torch.Tensor,
    *,
    chunk_size: int | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    """``usdm_loss(hidden @ weight.T + bias, z, x0, alpha, dalpha)`` without ever
    holding the full ``[B, L, K]`` logits: tokens are processed in chunks of
    ``chunk_size`` (default: ~64 MiB of float32 logits per chunk). ``hidden``:
    ``[B, L, d]``; ``weight``: ``[K, d]``; ``bias``: ``[K]`` or None (float32,
    or any float dtype: the chunk's logits are formed in it and the loss math
    runs in float32/float64). Differentiable w.r.t. hidden, weight and bias.
    Peak extra memory is O(chunk_size * K), independent of N.

    ``reduction``: ``"none"`` (default) returns the per-token ``[B, L]`` losses
    and recomputes each chunk's logits in backward (any ``grad_output``);
    ``"sum"`` / ``"mean"`` return the scalar sum / mean over tokens and, when a
    gradient is needed, compute the gradients in the forward, chunk by chunk
    (one logits GEMM and one kernel call per chunk instead of two of each; the
    float32 gradients of hidden and weight are held until backward, which then
    only scales them; one backward only). A ``-inf`` bias
    entry masks that id for every token: probability 0, as in
    :func:`usdm_loss` (its rows of the weight and bias gradients are 0).
    Bad values as :func:`usdm_loss`: NaN / +inf in hidden, weight or bias give
    NaN losses and gradients (no error); levels are checked; ids int64 or
    int32."""
    K = check_linear(hidden, weight, bias)
    z, x0 = token_ids(z, "z"), token_ids(x0, "x0")
    _check_ids_like(hidden, "hidden", z, x0)
    chunk_size = check_chunk_size(chunk_size, K, weight.shape[1])
    reduction = check_reduction(reduction)
    a = per_token_level(alpha, "alpha", z, "z")
    d = per_token_level(dalpha, "dalpha", z, "z")
    return linear_rows("linear_usdm_loss", _usdm_rows, hidden, weight, bias, (z.reshape(-1), x0.reshape(-1),
                       a.reshape(-1), d.reshape(-1)), chunk_size=chunk_size, reduction=reduction)


# --------------------------------------------------------------------------------------
# SPEC section 4: the reverse-process step
# --------------------------------------------------------------------------------------

def _step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p):
    check_tensor(logits, "logits", _LOGIT_DTYPES)
    z = token_ids(z, "z")
    if logits.dim() < 1:
        raise ValueError("duo_fast: logits must be [..., K], got a 0-dim tensor")
    check_vocab(logits.shape[-1], "logits.size(-1) (the vocabulary size)")
    _check_ids_like(logits, "logits", z)
    return (z, *_step_levels(z, alpha_t, alpha_s, kappa, temperature, top_p))


def _step_levels(z, alpha_t, alpha_s, kappa, temperature, top_p):
    """The levels (float64 of z's shape) and scalars of a reverse step, checked."""
    a_t = per_token_level(alpha_t, "alpha_t", z, "z")
    a_s = per_token_level(alpha_s, "alpha_s", z, "z")
    kappa = check_real(kappa, "kappa", 0.0, 1.0)
    temperature = check_real(temperature, "temperature", 0.0, float("inf"), lo_open=True, hi_open=True)
    top_p = check_real(top_p, "top_p", 0.0, 1.0, lo_open=True)
    return a_t, a_s, kappa, temperature, top_p


def sample_step(
    logits: torch.Tensor,
    z: torch.Tensor,
    alpha_t,
    alpha_s,
    *,
    kappa: float = 1.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """One reverse step of a uniform-state model: ``z_s ~ q(z_s | z_t, p)`` with
    ``p = softmax(logits / temperature)`` (SPEC 4, ``_ancestral_update`` /
    ``_psi_update`` + ``sample_categorical`` of the reference), without any
    ``[N, K]`` temporary.

    ``logits``: ``[B, L, K]`` (any leading shape) float32, bfloat16 or float16,
    read in float32; ``z``: int64 ids of the leading shape; ``alpha_t``,
    ``alpha_s``: levels per row or per token with ``0 <= alpha_t <= alpha_s <= 1``
    and ``alpha_t < 1`` (``alpha_s = 1`` is the noise-removal step). ``kappa``
    in [0, 1]: ``kappa < 1`` is the Psi-sampler mix ``kappa q_post + (1 - kappa)
    (alpha_s q_post(alpha_s=1) + (1 - alpha_s)/K)``. ``top_p`` in (0, 1]: nucleus
    filtering of ``p`` as ``utils.top_k_top_p_filtering`` (ties ranked by lower
    id; the boundary found by a radix select, not a sort).

    The draw is exact: the posterior is a mixture of ``p``, the uniform law and
    a point mass at ``z`` with weights that need only ``p_z``; one 53-bit
    uniform picks the part and another draws from ``p`` by inverse CDF against
    float64 running sums (no truncated tail). Per row: the max, the sum of
    ``exp((x - max)/T)``, then for the model part a scan of about half the row.
    Randomness per ``duo_fast._random``: with ``seed`` the tokens are identical
    on CPU (any thread count) and CUDA except where rounding of the sums moves
    the uniform across a token boundary (probability ~1e-15 per token).
    A ``-inf`` logit is probability 0 (masked vocabularies): never drawn from
    ``p`` (only the uniform part or the point mass at ``z`` can give it).
    ``z`` may be int64 or int32 (``z_s`` comes back in its dtype).

    Bad values (module docstring): a logits row with a NaN or +inf entry, or
    with no finite entry (only -inf), is no distribution: the op raises,
    naming ``logits`` (CPU: at the call, no tokens returned; CUDA: that row
    keeps ``z`` and the next duo_fast CUDA call, or
    :func:`check_device_errors`, raises). Levels out of range or NaN raise.
    """
    ids, a_t, a_s, kappa, temperature, top_p = _step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p)
    key = philox_seed(logits.device, generator, seed)
    out = torch.ops.duo_fast.sample_step.default(logits, ids, a_t, a_s, kappa, temperature, top_p, key, 0)
    return out.to(z.dtype)


@torch.library.register_fake("duo_fast::sample_step")
def _sample_step_fake(logits, z, alpha_t, alpha_s, kappa, temperature, top_p, seed, offset, row_offset=0):
    return z.new_empty(z.shape)


def posterior(
    logits: torch.Tensor,
    z: torch.Tensor,
    alpha_t,
    alpha_s,
    *,
    kappa: float = 1.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """The dense law ``q(z_s)`` ``[..., K]`` (float32) that :func:`sample_step`
    draws from, for analysis and tests (SPEC 4, ``_posterior_from_x0`` with
    ``x0 = p``, and the Psi mix for ``kappa < 1``). Same arguments as
    :func:`sample_step`. A ``-inf`` logit is probability 0 in ``p`` (its
    ``q`` is the uniform and point-mass parts alone). Bad values as
    :func:`sample_step`: a logits row with NaN, +inf or no finite entry raises
    (on CUDA: a NaN row of ``q``, and the next duo_fast CUDA call raises).
    Not differentiable."""
    ids, a_t, a_s, kappa, temperature, top_p = _step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p)
    return torch.ops.duo_fast.posterior.default(logits, ids, a_t, a_s, kappa, temperature, top_p)


@torch.library.register_fake("duo_fast::posterior")
def _posterior_fake(logits, z, alpha_t, alpha_s, kappa, temperature, top_p):
    return logits.new_empty(logits.shape, dtype=torch.float32)


# --------------------------------------------------------------------------------------
# SPEC section 2e: the Duo++ top-k curriculum input
# --------------------------------------------------------------------------------------

_ZT_RULES = {"exact": 0, "reference": 1}
_EMBEDDING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _curriculum_levels(x0: torch.Tensor, gamma, inv_tau) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma and inv_tau (tensors or Python floats) as float64 levels of x0's shape."""
    # torch.full, not torch.tensor: no host-to-device copy (a synchronization on CUDA)
    as_level = lambda v: v if isinstance(v, torch.Tensor) else torch.full((), float(v), dtype=torch.float64, device=x0.device)  # noqa: E731
    return per_token_level(as_level(gamma), "gamma", x0), per_token_level(as_level(inv_tau), "inv_tau", x0)


def _check_k(k, vocab_size: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"duo_fast: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= vocab_size - 1:
        raise ValueError(f"duo_fast: k must be in [1, vocab_size - 1] = [1, {vocab_size - 1}], got {k}")
    return k


def _check_x0_embedding(x0: torch.Tensor, embedding: torch.Tensor) -> int:
    """x0 int64 / int32 and embedding [K, d] (float32/bf16/fp16) on its device; returns K."""
    token_ids(x0, "x0")
    check_tensor(embedding, "embedding", _EMBEDDING_DTYPES)
    if embedding.dim() != 2:
        raise ValueError(f"duo_fast: embedding must be [vocab_size, d], got shape {tuple(embedding.shape)}")
    check_same_device(x0, "x0", embedding, "embedding")
    return check_vocab(embedding.shape[0], "embedding.shape[0] (the vocabulary size)")


def _zt_rule(zt_rule: str) -> int:
    if zt_rule not in _ZT_RULES:
        raise ValueError(f"duo_fast: zt_rule must be 'exact' or 'reference', got {zt_rule!r}")
    return _ZT_RULES[zt_rule]


def curriculum_topk(
    x0: torch.Tensor,
    gamma,
    inv_tau,
    k: int,
    vocab_size: int,
    *,
    zt_rule: str = "exact",
    generator: torch.Generator | None = None,
    seed: int | None = None,
):
    """The Duo++ top-k curriculum input (SPEC 2e): per token the k largest entries
    of the tempered Gaussian latent ``w = a~ onehot(x0) + s~ eps`` without drawing
    the K noises, as ``(ids [B, L, k] int64, weights [B, L, k] float32, z_t [B, L])``.

    ``x0``: ``[B, L]`` int64; ``gamma``: Gaussian log-noise level and ``inv_tau``
    (1/temperature, > 0) per row, per token or a float. Any ``1 <= k <=
    vocab_size - 1``. Order statistics from the top (Renyi), the x-entry, the
    tail below the k-th by its expectation, the tempered softmax weights
    (csrc/include/duo_fast/topk.h for the equations). ``ids`` are a uniformly
    random ordered k-tuple of distinct ids != x0 (every id equally likely at
    every rank), the last one x0 when the x-entry is in the top k.
    ``zt_rule="exact"``: ``z_t = x0`` iff the x-entry is the largest (so
    ``P(z_t = x0) = alpha(gamma)``'s pt); ``"reference"``: ``z_t = x0`` iff it
    is in the top k, as ``utils.sample_tempered_softmax_topk`` (biased towards
    x0 for k >= 2). With ``seed`` the ids and z_t are identical on CPU (any
    thread count) and CUDA; weights agree to rounding. Not differentiable.
    ``x0`` int64 or int32 (``ids`` and ``z_t`` come back in its dtype).
    Bad values: ``gamma`` must be finite and ``inv_tau`` finite and > 0 (else
    an error naming them, module docstring "Bad values").
    """
    ids = token_ids(x0, "x0")
    check_vocab(vocab_size)
    k = _check_k(k, vocab_size)
    g, it = _curriculum_levels(x0, gamma, inv_tau)
    key = philox_seed(x0.device, generator, seed)
    out, weights, z_t = torch.ops.duo_fast.curriculum_topk.default(ids, g, it, k, vocab_size, _zt_rule(zt_rule), key, 0)
    return out.to(x0.dtype), weights, z_t.to(x0.dtype)


@torch.library.register_fake("duo_fast::curriculum_topk")
def _curriculum_topk_fake(x0, gamma, inv_tau, k, vocab_size, zt_rule, seed, offset):
    shape = (*x0.shape, k)
    return x0.new_empty(shape), x0.new_empty(shape, dtype=torch.float32), x0.new_empty(x0.shape)


def curriculum_topk_embed(
    x0: torch.Tensor,
    gamma,
    inv_tau,
    k: int,
    embedding: torch.Tensor,
    *,
    zt_rule: str = "exact",
    generator: torch.Generator | None = None,
    seed: int | None = None,
):
    """:func:`curriculum_topk` fused with the weighted embedding bag
    ``h = sum_i w_i embedding[id_i]`` (SPEC 2e step 6): returns ``(h [B, L, d],
    z_t)``, ``h`` in ``embedding``'s dtype (float32, bfloat16 or float16;
    accumulated in float32), differentiable w.r.t. ``embedding``.
    ``vocab_size = embedding.shape[0]``. Backward scatters ``w_i grad_h`` into
    a float32 ``[K, d]`` gradient: on CPU always deterministic (entries
    counting-sorted by id, each row written once, same bits for any thread
    count); on CUDA with atomics, or deterministic (stable sort by id, one
    writer per row, no atomics) when ``torch.use_deterministic_algorithms(True)``.
    The CPU forward sums each ``h`` row in ascending id order (id-sorted bag;
    the per-token bag, in slot order, for tiny bags ``N k < 0.05 K``;
    ``DUO_FAST_TOPK_BAG=sorted|token`` forces one). The CPU gradient buffer
    (16 MiB and more) comes from duo_fast's cache of freed gradients, reused
    across steps (:func:`duo_fast.empty_cache`).
    Bad values: levels as :func:`curriculum_topk` (raise); a NaN / inf
    embedding row gives NaN / inf in the ``h`` of the tokens whose bag holds
    it (propagates, no error). ``x0`` int64 or int32 (``z_t`` in its dtype).
    """
    K = _check_x0_embedding(x0, embedding)
    k = _check_k(k, K)
    g, it = _curriculum_levels(x0, gamma, inv_tau)
    key = philox_seed(x0.device, generator, seed)
    h, z_t, _, _ = torch.ops.duo_fast.curriculum_topk_embed.default(
        token_ids(x0, "x0"), g, it, k, embedding, _zt_rule(zt_rule), key, 0
    )
    return h, z_t.to(x0.dtype)


@torch.library.register_fake("duo_fast::curriculum_topk_embed")
def _curriculum_topk_embed_fake(x0, gamma, inv_tau, k, embedding, zt_rule, seed, offset):
    shape = (*x0.shape, k)
    h = embedding.new_empty((*x0.shape, embedding.shape[1]))
    return h, x0.new_empty(x0.shape), x0.new_empty(shape), x0.new_empty(shape, dtype=torch.float32)


def _topk_embed_setup_context(ctx, inputs, output):
    _, _, ids, weights = output
    ctx.save_for_backward(ids, weights)
    embedding = inputs[4]
    ctx.vocab_size, ctx.embedding_dtype = embedding.shape[0], embedding.dtype
    ctx.set_materialize_grads(False)


def _topk_embed_backward(ctx, grad_h, grad_z, grad_ids, grad_weights):
    if grad_h is None or not ctx.needs_input_grad[4]:
        return None, None, None, None, None, None, None, None
    ids, weights = ctx.saved_tensors
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad = torch.ops.duo_fast.topk_bag_backward.default(grad_h, ids, weights, ctx.vocab_size, deterministic)
    return None, None, None, None, grad.to(ctx.embedding_dtype), None, None, None


torch.library.register_autograd(
    "duo_fast::curriculum_topk_embed", _topk_embed_backward, setup_context=_topk_embed_setup_context
)


@torch.library.register_fake("duo_fast::topk_bag_backward")
def _topk_bag_backward_fake(grad_h, ids, weights, vocab_size, deterministic):
    return grad_h.new_empty((vocab_size, grad_h.shape[-1]), dtype=torch.float32)


# --------------------------------------------------------------------------------------
# SPEC sections 2c, 2d: the exact curriculum input
# --------------------------------------------------------------------------------------


def curriculum_embed(
    x0: torch.Tensor,
    gamma,
    inv_tau,
    embedding: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
):
    """The exact curriculum soft input of Duo (SPEC 2d): ``h = softmax(w * inv_tau)
    @ embedding`` with the Gaussian latent ``w = a~ onehot(x0) + s~ eps`` over all
    K entries, and ``z_t = argmax w``. Returns ``(h [B, L, d], z_t [B, L])``,
    ``h`` in ``embedding``'s dtype (float32, bfloat16 or float16; math in
    float32 with scores in float64), differentiable w.r.t. ``embedding``.

    ``eps[token, j]`` is generated inside the kernel from Philox (SPEC 2c) and
    never stored: forward and backward regenerate it, like FlashAttention's
    scores (online softmax over tiles of K; CPU: BLAS GEMMs on tiles of
    P; backward from the saved row log-sum-exp). Memory O(N d + K d) (the
    embedding's float32 copy when it is not float32), never O(N K); the CPU
    gradient buffer (16 MiB and more) comes from duo_fast's cache of freed
    gradients, reused across steps (:func:`duo_fast.empty_cache`).
    ``gamma`` finite and ``inv_tau`` > 0 per row, per token or a float;
    ``inv_tau`` from 1 to 1e4 and beyond stay finite. With ``seed`` the
    outputs are identical on CPU (any thread count) and CUDA up to float
    rounding of the sums (z_t except at exact near-ties). ``x0`` int64 or
    int32 (``z_t`` in its dtype).

    Bad values: ``gamma`` must be finite and ``inv_tau`` finite and > 0
    (raise, module docstring "Bad values"); a NaN or inf in ``embedding``
    gives NaN / inf in ``h`` (propagates, no error).

    Recomputation (``torch.utils.checkpoint``, or calling again): the noise is
    a function of the Philox key. With ``seed`` a recomputation draws the same
    noise. Without it the key is drawn from the generator: the default
    (global) generator is restored by checkpoint's ``preserve_rng_state=True``
    (its default), so the recomputation matches too; an explicit
    ``generator=`` is not restored by checkpoint and the recomputation gets new
    noise (wrong gradients): inside a checkpointed block pass ``seed=`` (e.g.
    drawn from that generator outside the block) or use the default generator.
    The same holds for every random op of this module.
    """
    _check_x0_embedding(x0, embedding)
    g, it = _curriculum_levels(x0, gamma, inv_tau)
    key = philox_seed(x0.device, generator, seed)
    h, z_t, _ = torch.ops.duo_fast.curriculum_embed.default(token_ids(x0, "x0"), g, it, embedding, key, 0)
    return h, z_t.to(x0.dtype)


@torch.library.register_fake("duo_fast::curriculum_embed")
def _curriculum_embed_fake(x0, gamma, inv_tau, embedding, seed, offset):
    h = embedding.new_empty((*x0.shape, embedding.shape[1]))
    return h, x0.new_empty(x0.shape), x0.new_empty(x0.shape, dtype=torch.float64)


def _curriculum_embed_setup_context(ctx, inputs, output):
    x0, gamma, inv_tau, embedding, seed, offset = inputs
    ctx.save_for_backward(x0, gamma, inv_tau, output[2])
    ctx.vocab_size, ctx.embedding_dtype, ctx.seed, ctx.offset = embedding.shape[0], embedding.dtype, seed, offset
    ctx.set_materialize_grads(False)


def _curriculum_embed_backward(ctx, grad_h, grad_z, grad_lse):
    if grad_h is None or not ctx.needs_input_grad[3]:
        return None, None, None, None, None, None
    x0, gamma, inv_tau, lse = ctx.saved_tensors
    grad = torch.ops.duo_fast.curriculum_embed_backward.default(
        grad_h, x0, gamma, inv_tau, lse, ctx.vocab_size, ctx.seed, ctx.offset
    )
    return None, None, None, grad.to(ctx.embedding_dtype), None, None


torch.library.register_autograd(
    "duo_fast::curriculum_embed", _curriculum_embed_backward, setup_context=_curriculum_embed_setup_context
)


@torch.library.register_fake("duo_fast::curriculum_embed_backward")
def _curriculum_embed_backward_fake(grad_h, x0, gamma, inv_tau, lse, vocab_size, seed, offset):
    return grad_h.new_empty((vocab_size, grad_h.shape[-1]), dtype=torch.float32)


# --------------------------------------------------------------------------------------
# Device-side value checks (module docstring, "Bad values")
# --------------------------------------------------------------------------------------


def check_device_errors(device: torch.device | str | int | None = None) -> None:
    """Raise now the invalid values that duo_fast's CUDA kernels found on
    ``device`` (default: the current CUDA device), instead of at the next
    duo_fast CUDA call: waits for the device (one synchronization) and raises a
    RuntimeError naming the arguments (invalid ids or levels, logits rows with
    no distribution). A no-op for CPU tensors, whose ops raise at the call.
    :func:`duo_fast.generate` calls it before returning its tokens."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type == "cpu":
        return
    torch.ops.duo_fast.check_device_errors.default(torch.empty(0, device=device))


@torch.library.register_fake("duo_fast::check_device_errors")
def _check_device_errors_fake(device_like):
    return None
