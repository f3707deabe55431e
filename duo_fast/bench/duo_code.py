"""The reference side of the benchmarks: the Duo code's own operations.

Every reference side of ``duo-fast bench`` runs what the Duo codebase
(github ``s-sahoo/duo``) runs: its functions, imported from a checkout
(``$DUO_REFERENCE_DIR``, or ``../shared/duo-reference`` beside a source
checkout of duo_fast; see :mod:`duo_fast.integrations.duo_reference`, which
also stands in for ``flash_attn`` where it cannot be imported):

* the loss: ``DUO_BASE._process_model_output`` (``log_softmax``) and
  ``DUO_BASE.nll_per_token``;
* sampling: ``_ancestral_update`` (``trainer_base``), which calls
  ``_get_ancestral_posterior``, ``_get_posterior_from_xt`` (float64 cast,
  ``utils.top_k_top_p_filtering`` when ``p_nucleus < 1``),
  ``DUO_BASE._posterior_from_x0`` and ``trainer_base.sample_categorical``;
* the simple curriculum: ``DUO._q_xt_gaussian`` on the one-hot, the
  ``* inverse temperature`` and ``argmax`` of ``DUO.nll``, and
  ``models.dit.EmbeddingLayer.forward`` (softmax, einsum with the embedding);
* the top-k curriculum: ``utils.sample_tempered_softmax_topk`` and
  ``EmbeddingLayer.forward`` with its weights (``F.embedding_bag``,
  ``mode="sum"``, ``per_sample_weights``);
* the distillation pair: ``Distillation._sample_trajectory`` and two argmax;
* the schedule: ``DUO._gamma_to_alpha_dalpha_cached`` (the table lookup of
  ``_gamma_to_alphat_integral`` and its finite difference) on the pickle that
  ``DUO._init_curriculum_cached`` loads (``integral/gpt2.pkl``, K = 50257).

Methods are called unbound on a *stand-in model*: a small object that has
just the attributes those methods read (``vocab_size``, ``dtype``,
``device``, ``config.sampling``, ``noise``, ``p_nucleus``, ...) and, as
methods, the Duo classes' own functions (looked up through
``algo.Distillation``'s MRO, i.e. what a Duo model instance runs). Its
``forward`` returns ``_process_model_output`` of given logits in place of the
backbone's, which no benchmark here times.

Where the Duo code is absent (a user's machine, an installed wheel) the
reference is an *eager copy*: :class:`EagerModel`, :class:`EagerEmbeddingLayer`
and :func:`eager_sample_tempered_softmax_topk` call the same torch operations
in the same order (the tests check that they give the same numbers as the Duo
code from the same random state). ``Reference.source`` says which one ran
("Duo code" or "eager copy"), and the report prints it. ``$DUO_FAST_BENCH_REFERENCE``
= ``duo`` requires the Duo code, ``eager`` forces the copy (default ``auto``).
"""

from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import _env

SOURCE_DUO = "Duo code"
SOURCE_EAGER = "eager copy"
ENV_VAR = "DUO_FAST_BENCH_REFERENCE"
DUO_GAMMA_MIN, DUO_GAMMA_MAX = -3.5, -1.75  # configs/algo/duo.yaml, curriculum

# What a Duo model instance runs, taken from the Duo classes (resolved through
# algo.Distillation's MRO: Distillation -> DUO -> DUO_BASE -> UniformState ->
# Diffusion -> TrainerBase).
MODEL_METHODS = (
    "_process_model_output",   # DUO_BASE: log_softmax
    "nll_per_token",           # DUO_BASE: the uniform-state NELBO
    "_sigma_from_alphat",      # Diffusion
    "_ancestral_update",       # Diffusion
    "_get_ancestral_posterior",  # Diffusion
    "_get_posterior_from_xt",  # Diffusion
    "_posterior_from_x0",      # DUO_BASE
    "_q_xt_gaussian",          # DUO
    "_sample_trajectory",      # Distillation
    "_init_curriculum_cached",  # DUO: loads integral/<tokenizer>.pkl
    "_gamma_to_alphat_integral",  # DUO
    "_gamma_to_alpha_dalpha_cached",  # DUO
)


@dataclass
class Reference:
    """The reference implementation in use: the Duo code or the eager copy.

    Model(vocab_size, device, ...) -> a stand-in model with MODEL_METHODS;
    EmbeddingLayer(embedding) -> a module with .embedding and forward(x, weights=None);
    sample_tempered_softmax_topk(...) -> (weights, ids, xt_usdm), as utils'.
    """

    source: str  # SOURCE_DUO or SOURCE_EAGER
    reason: str  # why the eager copy runs ("" for the Duo code)
    Model: Callable[..., Any]
    EmbeddingLayer: Callable[[torch.Tensor], torch.nn.Module]
    sample_tempered_softmax_topk: Callable[..., tuple]
    integral_cache_path: str | None  # the Duo code's integral/gpt2.pkl (None without it)
    path: str | None = None  # the Duo checkout


def _model_init(self, vocab_size: int, device="cpu", *, use_float64: bool = True, p_nucleus: float = 1.0,
                logits: torch.Tensor | None = None, integral_cache_path: str | None = None,
                gamma_min: float = DUO_GAMMA_MIN, gamma_max: float = DUO_GAMMA_MAX, noise=None):
    """The attributes the Duo methods read (LightningModule's dtype/device,
    TrainerBase's vocab_size, p_nucleus, class_conditional, noise and config)."""
    self.vocab_size = vocab_size
    self.dtype = torch.float32
    self.device = torch.device(device)
    self.p_nucleus = p_nucleus
    self.class_conditional = False
    self.logits = logits
    self.gamma_min, self.gamma_max = gamma_min, gamma_max
    self.noise = noise
    self.config = types.SimpleNamespace(
        sampling=types.SimpleNamespace(use_float64=use_float64, guid_weight=None, p_nucleus=p_nucleus),
        algo=types.SimpleNamespace(curriculum=types.SimpleNamespace(
            integral_cache_path=integral_cache_path, gamma_min=gamma_min, gamma_max=gamma_max)),
    )
    if integral_cache_path is not None:
        self._init_curriculum_cached()


def _model_forward(self, xt, sigma, labels=None, weights=None, nn_input_idxs=None):
    """In place of TrainerBase.forward (backbone, then _process_model_output): the
    given logits through the model's own _process_model_output."""
    del labels, weights, nn_input_idxs
    return self._process_model_output(self.logits, xt, sigma)


def _duo_reference(ref) -> Reference:
    from duo_fast.integrations.duo import _MARK

    methods = {}
    for name in MODEL_METHODS:
        fn = getattr(ref.algo.Distillation, name)
        if getattr(fn, _MARK, False):
            raise RuntimeError(f"the Duo code's {name} is patched by duo_fast.integrations.duo: undo the patch "
                               "before measuring the reference")
        methods[name] = fn
    topk = ref.utils.sample_tempered_softmax_topk
    if getattr(topk, _MARK, False):
        raise RuntimeError("utils.sample_tempered_softmax_topk is patched by duo_fast.integrations.duo")
    log_linear = ref.trainer_base.LogLinear

    def init(self, vocab_size, device="cpu", **kw):
        kw.setdefault("noise", log_linear(0.0))  # the Duo code's log-linear schedule, eps = 0: alpha = 1 - t
        _model_init(self, vocab_size, device, **kw)

    model_cls = type("DuoModelStandIn", (), {
        "__doc__": "Stand-in for a Duo model: the attributes the Duo methods read; the methods are the Duo code's.",
        "__init__": init, "forward": _model_forward, **methods})
    dit = ref.dit

    def embedding_layer(embedding: torch.Tensor) -> torch.nn.Module:
        layer = dit.EmbeddingLayer(embedding.shape[1], embedding.shape[0]).to(embedding.device)
        with torch.no_grad():
            layer.embedding.copy_(embedding)
        return layer

    pkl = ref.path / "integral" / "gpt2.pkl"
    return Reference(source=SOURCE_DUO, reason="", Model=model_cls, EmbeddingLayer=embedding_layer,
                     sample_tempered_softmax_topk=topk,
                     integral_cache_path=str(pkl) if pkl.is_file() else None, path=str(ref.path))


@functools.lru_cache(maxsize=None)
def reference() -> Reference:
    """The Duo code when it can be imported here (unless $DUO_FAST_BENCH_REFERENCE=eager),
    else the eager copy (an error if $DUO_FAST_BENCH_REFERENCE=duo)."""
    choice = _env.get(ENV_VAR, "auto").lower()
    reason = f"${ENV_VAR}=eager"
    if choice != "eager":
        from duo_fast.integrations import duo_reference

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _duo_reference(duo_reference.load())
        except duo_reference.ReferenceUnavailable as e:
            if choice == "duo":
                raise
            reason = str(e)
    return Reference(source=SOURCE_EAGER, reason=reason, Model=EagerModel, EmbeddingLayer=EagerEmbeddingLayer,
                     sample_tempered_softmax_topk=eager_sample_tempered_softmax_topk, integral_cache_path=None)


def source() -> str:
    """'Duo code' or 'eager copy' (Impl.source of the reference sides)."""
    return reference().source


# ======================================================================================
# The eager copy: the same torch operations as the Duo code, in the same order, for
# machines without it. Each function names the Duo function it follows.
# ======================================================================================


class EagerModel:
    """Eager copy of the Duo model methods the benchmarks call (same signatures)."""

    def __init__(self, vocab_size, device="cpu", **kw):
        kw.setdefault("noise", eager_log_linear)
        _model_init(self, vocab_size, device, **kw)

    forward = _model_forward

    def _process_model_output(self, model_output, xt, sigma):  # DUO_BASE
        del xt, sigma
        return model_output.log_softmax(dim=-1)

    def nll_per_token(self, log_x_theta, xt, x0, alpha_t, dalpha_t, low_var=False):  # DUO_BASE
        K = self.vocab_size
        x_reconst = log_x_theta.exp()
        x_bar_theta = K * alpha_t[:, :, None] * x_reconst + 1 - alpha_t[:, :, None]
        coeff = dalpha_t / (K * alpha_t)
        x_eq_xt = (x0 == xt).float()
        x_neq_xt = 1 - x_eq_xt
        xbar_xt = (1 - alpha_t) + K * alpha_t * x_eq_xt
        xbar_theta_xt = torch.gather(x_bar_theta, -1, xt.unsqueeze(-1)).squeeze(-1)
        xbar_theta_x = torch.gather(x_bar_theta, -1, x0.unsqueeze(-1)).squeeze(-1)
        term1 = K * (1 / xbar_xt - 1 / xbar_theta_xt)
        const = (1 - alpha_t) / (K * alpha_t + 1 - alpha_t)
        term2_coefs = x_eq_xt * const + x_neq_xt
        term2_offset = ((K - 1) * const * x_eq_xt - (1 / const) * x_neq_xt) * const.log()
        term2_theta = -term2_coefs * (x_bar_theta.log().sum(-1) - K * xbar_theta_xt.log())
        term2_theta = term2_theta - K * alpha_t / (1 - alpha_t) * (xbar_theta_x.log() - xbar_theta_xt.log()) * x_neq_xt
        return coeff * (term1 - (term2_theta + term2_offset))

    def _sigma_from_alphat(self, alpha_t):  # Diffusion
        return -torch.log(alpha_t)

    def _ancestral_update(self, x, t, labels, dt, p_x0=None, noise_removal_step=False):  # Diffusion
        _, alpha_t = self.noise(t)
        if noise_removal_step:
            alpha_s = torch.ones_like(alpha_t)
        else:
            _, alpha_s = self.noise(t - dt)
        sigma = self._sigma_from_alphat(alpha_t)
        p_x0, q_xs = self._get_posterior_from_xt(x, sigma, labels, alpha_s, alpha_t, p_x0)
        return p_x0, eager_sample_categorical(q_xs)

    def _get_ancestral_posterior(self, xt, sigma, labels, alpha_s, alpha_t, p_x0):  # Diffusion (no guidance)
        return self._get_posterior_from_xt(xt, sigma, labels, alpha_s, alpha_t, p_x0)

    def _get_posterior_from_xt(self, xt, sigma, labels, alpha_s, alpha_t, p_x0=None):  # Diffusion
        if p_x0 is None:
            log_x0_pred = self.forward(xt, sigma, labels)
            if self.config.sampling.use_float64:
                log_x0_pred = log_x0_pred.to(torch.float64)
            if self.p_nucleus < 1:
                log_x0_pred = eager_top_p_filtering(log_x0_pred, top_p=self.p_nucleus)
            p_x0 = log_x0_pred.exp()
        return p_x0, self._posterior_from_x0(x0=p_x0, xt=xt, alpha_s=alpha_s, alpha_t=alpha_t)

    def _posterior_from_x0(self, x0, xt, alpha_s, alpha_t):  # DUO_BASE
        if self.config.sampling.use_float64:
            x0 = x0.to(torch.float64)
        if alpha_s.ndim == 2:
            alpha_s = alpha_s.unsqueeze(-1)
        if alpha_t.ndim == 2:
            alpha_t = alpha_t.unsqueeze(-1)
        alpha_ts = alpha_t / alpha_s
        d_alpha = alpha_s - alpha_t
        K = self.vocab_size
        xt_one_hot = F.one_hot(xt, K).to(self.dtype).to(self.device)
        return ((alpha_t * K * x0 * xt_one_hot + (alpha_ts - alpha_t) * xt_one_hot + d_alpha * x0
                 + (1 - alpha_ts) * (1 - alpha_s) / K)
                / (alpha_t * K * torch.gather(x0, -1, xt[..., None]) + (1 - alpha_t)))

    def _q_xt_gaussian(self, x, gamma_t):  # DUO
        gamma_t = gamma_t.unsqueeze(-1).unsqueeze(-1)
        alpha_t = torch.sigmoid(-gamma_t).sqrt()
        sigma_t = torch.sigmoid(gamma_t).sqrt()
        epsilon = torch.randn(x.shape, dtype=torch.float32, device=self.device)
        return alpha_t * x + sigma_t * epsilon

    def _sample_trajectory(self, x0, gamma_t, gamma_s):  # Distillation
        x0 = F.one_hot(x0, self.vocab_size).to(self.dtype).to(self.device)
        gamma_t = gamma_t.unsqueeze(-1).unsqueeze(-1)
        alpha_t = torch.sigmoid(-gamma_t).sqrt()
        sigma_t = torch.sigmoid(gamma_t).sqrt()
        gamma_s = gamma_s.unsqueeze(-1).unsqueeze(-1)
        alpha_s = torch.sigmoid(-gamma_s).sqrt()
        sigma_s = torch.sigmoid(gamma_s).sqrt()
        epsilon = torch.randn(x0.shape, dtype=torch.float32, device=self.device)
        return alpha_t * x0 + sigma_t * epsilon, alpha_s * x0 + sigma_s * epsilon

    def _init_curriculum_cached(self):  # needs the Duo code's pickle
        raise RuntimeError("the eager copy has no integral table (it is a file of the Duo code)")


def eager_log_linear(t, eps=0.0):  # trainer_base.LogLinear(eps).forward
    t = (1 - eps) * t
    alpha_t = 1 - t
    return -torch.ones_like(alpha_t) * (1 - eps), alpha_t


def eager_sample_categorical(categorical_probs):  # trainer_base.sample_categorical
    gumbel_norm = 1e-10 - (torch.rand_like(categorical_probs) + 1e-10).log()
    return (categorical_probs / gumbel_norm).argmax(dim=-1)


def eager_top_p_filtering(logits, top_p, filter_value=-float("inf")):  # utils.top_k_top_p_filtering (top_k=0)
    sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
    cum_probs = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum_probs > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = 0
    mask = torch.empty_like(remove)
    mask.scatter_(dim=-1, index=sorted_indices, src=remove)
    logits[mask] = filter_value
    probs = logits.exp()
    return (probs / probs.sum(-1, keepdim=True)).log()


class EagerEmbeddingLayer(torch.nn.Module):
    """models.dit.EmbeddingLayer: embedding bag with weights, row lookup for ids,
    softmax @ embedding for a dense latent."""

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.embedding = torch.nn.Parameter(embedding.detach().clone())

    def forward(self, x, weights=None):
        if weights is not None:
            bs, seq_len, k = x.shape
            bag = F.embedding_bag(x.reshape(-1, k), self.embedding.float(),
                                  per_sample_weights=weights.reshape(-1, k).float(), mode="sum")
            return bag.view(bs, seq_len, -1)
        if x.ndim == 2:
            return self.embedding[x]
        return torch.einsum("blv,ve->ble", F.softmax(x, dim=-1).float(), self.embedding.float()).to(x.dtype)


def _eager_sample_k_int(bs, l, k, max_value, device):  # utils._sample_k_int (Floyd's algorithm)
    out = torch.empty(size=(bs, l, k), dtype=torch.int64, device=device)
    for t, i in enumerate(range(max_value - k, max_value)):
        j = torch.randint(0, i + 1, size=(bs, l), device=device)
        if t > 0:
            dup = (out[..., :t] == j[..., None]).any(dim=-1)
            out[..., t] = torch.where(dup, i, j)
        else:
            out[..., 0] = j
    return out


def eager_sample_tempered_softmax_topk(extra_index, alpha, sigma, l, k, vocab_size, inverse_temperature=1.0):
    """utils.sample_tempered_softmax_topk (with _sample_topk_and_extra,
    _sample_topk_gaussian, _log_mean_exp_trunc_normal, _sample_k_int)."""
    alpha = alpha.to(torch.float64)
    sigma = sigma.to(torch.float64)
    N = vocab_size - 1
    log_u = torch.log(torch.rand(sigma.shape[0], l, k, device=sigma.device, dtype=sigma.dtype))
    divisors = torch.arange(N, N - k, -1, device=sigma.device, dtype=sigma.dtype)
    top_k = torch.special.ndtri(torch.exp(torch.cumsum(log_u / divisors, dim=-1))) * sigma[:, None, None]
    extra = alpha[:, None] + torch.randn(size=(alpha.shape[0], l), device=alpha.device) * sigma[:, None]
    is_extra_in_topk = extra > top_k[:, :, -1]
    top_k[:, :, -1][is_extra_in_topk] = extra[is_extra_in_topk]
    min_rv = torch.where(is_extra_in_topk, top_k[:, :, -2], top_k[:, :, -1])
    scaled_sigma = sigma[:, None] * inverse_temperature
    scaled_c = min_rv * inverse_temperature
    log_mu = (scaled_sigma ** 2 / 2.0 + torch.special.log_ndtr((scaled_c - scaled_sigma ** 2) / scaled_sigma)
              - torch.special.log_ndtr(scaled_c / scaled_sigma))
    log_topk = top_k * inverse_temperature
    count = torch.where(is_extra_in_topk, vocab_size - k, vocab_size - k - 1).to(log_mu.dtype)
    log_tail = torch.log(count) + log_mu
    log_extra = extra * inverse_temperature
    extra_not_in_topk = ~is_extra_in_topk
    log_extra_masked = torch.full_like(log_tail, float("-inf"))
    log_extra_masked[extra_not_in_topk] = log_extra[extra_not_in_topk]
    log_contribs = torch.cat([log_topk, log_tail[..., None], log_extra_masked[..., None]], dim=-1)
    log_denom = torch.logsumexp(log_contribs, dim=-1, keepdim=True)
    softmax_approx = torch.exp(log_topk - log_denom)
    zero_sum = softmax_approx.sum(dim=-1, keepdim=True) == 0.0
    softmax_approx = torch.where(zero_sum, 0.0, softmax_approx)
    softmax_approx[..., 0][zero_sum[..., 0]] = 1.0
    indices = _eager_sample_k_int(alpha.shape[0], l, k, max_value=vocab_size - 1, device=alpha.device)
    indices[indices >= extra_index[..., None]] += 1
    indices[..., -1][is_extra_in_topk] = extra_index[is_extra_in_topk]
    xt_usdm = torch.where(is_extra_in_topk, extra_index, indices[..., 0])
    return softmax_approx, indices, xt_usdm


# ======================================================================================
# The benchmarked reference operations, written once on top of either implementation
# ======================================================================================


def simple_curriculum(model, layer, x0, gamma_t, inverse_temperature):
    """DUO.nll's simple branch up to the backbone's input: one-hot,
    _q_xt_gaussian, * 1/tau, argmax; then EmbeddingLayer.forward (softmax @ E).
    Returns (h, z_t)."""
    x0_one_hot = F.one_hot(x0, model.vocab_size)
    xt = model._q_xt_gaussian(x0_one_hot, gamma_t)
    xt = xt * inverse_temperature
    return layer(xt), xt.argmax(-1)


def topk_curriculum(ref: Reference, x0, gamma_t, inverse_temperature, k, vocab_size):
    """DUO.nll's efficient branch: (weights, ids, z_t) of sample_tempered_softmax_topk."""
    return ref.sample_tempered_softmax_topk(
        extra_index=x0, alpha=torch.sigmoid(-gamma_t).sqrt(), sigma=torch.sigmoid(gamma_t).sqrt(),
        l=x0.shape[1], k=k, vocab_size=vocab_size, inverse_temperature=inverse_temperature)


def latent_argmax(model, x0, gamma_t):
    """The single latent of the simple curriculum: argmax of _q_xt_gaussian(one-hot)."""
    return model._q_xt_gaussian(F.one_hot(x0, model.vocab_size), gamma_t).argmax(-1)


def trajectory_argmax(model, x0, gamma_t, gamma_s):
    """Distillation.nll's coupled pair: _sample_trajectory, then argmax of each."""
    xt, xs = model._sample_trajectory(x0, gamma_t, gamma_s)
    return xt.argmax(-1), xs.argmax(-1)


def loss(model, logits, xt, x0, alpha_t, dalpha_t):
    """DUO_BASE's per-token loss from raw logits: _process_model_output (log_softmax),
    then nll_per_token. alpha_t, dalpha_t: [B, 1]."""
    log_x_theta = model._process_model_output(logits, xt, None)
    return model.nll_per_token(log_x_theta=log_x_theta, xt=xt, x0=x0, alpha_t=alpha_t, dalpha_t=dalpha_t)


def kl_bwd(model, student_logits, teacher_logits):
    """Distillation.nll's kl-bwd loss on logits: both through _process_model_output
    (log_softmax; the teacher detached, as _teacher_logits returns it), then the KL
    expression that Distillation.nll writes inline (there is no function for it)."""
    ls = model._process_model_output(student_logits, None, None)
    lt = model._process_model_output(teacher_logits.detach(), None, None)
    return (ls.exp() * (ls - lt)).sum(-1)


def ancestral_step(model, z, alpha_t, alpha_s, noise_removal=False):
    """One _ancestral_update from the model's logits: t = 1 - alpha_t and
    dt = alpha_s - alpha_t under the log-linear schedule with eps = 0, so the
    posterior sees exactly alpha_t and alpha_s ([B, 1])."""
    t = 1 - alpha_t
    return model._ancestral_update(z, t, None, alpha_s - alpha_t, noise_removal_step=noise_removal)[1]
