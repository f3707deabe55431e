"""duo_fast.integrations.diffusion_gemma against transformers' own DiffusionGemma
code (models/diffusion_gemma; a tiny random-weight DiffusionGemmaForBlockDiffusion
built from a DiffusionGemmaConfig, nothing downloaded):

* on the same logits: the argmax identical, the entropies within 1e-5 relative
  of the float64 reference and of the original's float32 ones, the acceptance
  masks (ties included) and the stopping decisions identical to
  EntropyBoundSampler's and StableAndConfidentStoppingCriteria's;
* the patched step's draws follow softmax(logits / T) (chi-square at fixed
  seeds), as the original step's do;
* the soft embedding within the bf16 bound of the original's (a bf16 model);
* generate() patched vs unpatched: shapes, EOS / pad handling, identical
  sequences and tokens_per_forward where the original is deterministic
  (temperatures so low that every draw is the argmax, every token accepted),
  and the laws of tokens_per_forward agree (chi-square on the counts) where
  it is not;
* calls the patch does not cover keep the original step (one log line), undo()
  restores every object by identity, no double patching.
"""

from __future__ import annotations

import logging
import math

import pytest
import scipy.stats as st
import torch

pytest.importorskip("transformers.models.diffusion_gemma", reason="transformers >= 5.11 (requirements-test.txt) is not installed")

import duo_fast  # noqa: E402
import duo_fast.integrations.diffusion_gemma as dg  # noqa: E402
from duo_fast import reference as ref  # noqa: E402
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion  # noqa: E402
from transformers.generation import LogitsProcessor, LogitsProcessorList  # noqa: E402
from transformers.models.diffusion_gemma import generation_diffusion_gemma as G  # noqa: E402
from transformers.models.diffusion_gemma import modeling_diffusion_gemma as M  # noqa: E402

V, CANVAS = 97, 8
EOS, PAD = 1, 0


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    text = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, global_head_dim=16, max_position_embeddings=256,
                sliding_window=16, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, num_experts=2,
                top_k_experts=1, moe_intermediate_size=16, layer_types=["sliding_attention", "full_attention"])
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=None, canvas_length=CANVAS, image_token_id=96,
                               boi_token_id=95, eoi_token_id=94)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval().to(dtype)
    with torch.no_grad():  # larger weights than the init's: logits that spread, entropies of all sizes
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture
def patched():
    p = dg.patch()
    yield p
    p.undo()


def _logits(B, L, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, V, generator=g) * scale
    x[0, 1] = x[0, 3]  # equal rows: equal entropies (a tie for the sort)
    x[0, 5] = x[0, 3]
    x[1, 2, :] = -30.0  # a confident token
    x[1, 2, 7] = 30.0
    return x


# ---------------------------------------------------------------------------------------
# the same logits: argmax, entropies, acceptance, stopping
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cur_step", [12, 3, 1])
def test_step_outputs_match_the_original_on_the_same_logits(cur_step):
    B, L, steps = 3, 16, 12
    raw = _logits(B, L, cur_step)
    proc = G.LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=steps)
    processed = proc(None, raw, cur_step=torch.tensor(cur_step, dtype=torch.int32))
    T = dg._step_temperature(LogitsProcessorList([proc]), cur_step, G)
    sample, argmax, entropy = duo_fast.canvas_step(raw, temperature=T, seed=cur_step)
    assert torch.equal(argmax, torch.argmax(processed, dim=-1))
    orig_entropy = torch.distributions.Categorical(logits=processed).entropy()
    torch.testing.assert_close(entropy.double(), ref.canvas_entropy(raw, T), rtol=1e-5, atol=1e-30)  # e^-87: 0
    torch.testing.assert_close(entropy, orig_entropy, rtol=1e-5, atol=2e-6)
    assert entropy[0, 1] == entropy[0, 3] == entropy[0, 5]
    for bound in (0.1, 3.0, 40.0):  # one token, several (through the tie), all but a few
        sampler = G.EntropyBoundSampler(G.EntropyBoundSamplerConfig(entropy_bound=bound), L, V, steps)
        canvas = torch.randint(0, V, (B, L))
        sampler.accept_canvas(canvas, sample, processed, cur_step)
        assert torch.equal(dg.accept_mask(entropy, bound), sampler.accepted_token_mask)
    # stopping: the same decisions over a few steps (the stability history included)
    a = G.StableAndConfidentStoppingCriteria(stability_threshold=2, confidence_threshold=1.5)
    b = G.StableAndConfidentStoppingCriteria(stability_threshold=2, confidence_threshold=1.5)
    for i in range(4):
        canvas = argmax if i > 0 else torch.zeros_like(argmax)
        assert torch.equal(dg.stable_and_confident(a, canvas, entropy), b(canvas, processed))
    assert dg.stable_and_confident(a, argmax, entropy).tolist() == b(argmax, processed).tolist()


def test_acceptance_ties_follow_the_originals_order():
    # many exact ties (rows of equal logits): the stable sort keeps positions in order
    B, L = 2, 12
    base = _logits(2, 8, 7)[0, 5:]
    raw = base[torch.arange(B * L) % 3].reshape(B, L, V)
    entropy = duo_fast.canvas_step(raw, seed=1)[2]
    sampler = G.EntropyBoundSampler(G.EntropyBoundSamplerConfig(entropy_bound=float(entropy.max()) * 2.5), L, V, 4)
    sampler.accept_canvas(torch.zeros(B, L, dtype=torch.long), torch.ones(B, L, dtype=torch.long), raw, 1)
    assert torch.equal(dg.accept_mask(entropy, sampler.entropy_bound), sampler.accepted_token_mask)


# ---------------------------------------------------------------------------------------
# the law of the patched step's draws; the soft embedding
# ---------------------------------------------------------------------------------------


class _Outputs:
    def __init__(self, logits):
        self.logits = logits


def _run_step(model, raw, cur_step, steps, bound):
    B, L = raw.shape[:2]
    sampler = G.EntropyBoundSampler(G.EntropyBoundSamplerConfig(entropy_bound=bound), L, V, steps)
    proc = LogitsProcessorList([G.LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=steps)])
    canvas = torch.randint(0, V, (B, L))
    return model._denoising_step(
        decoder_forward=model.forward, current_canvas=canvas, argmax_canvas=canvas, input_ids=None,
        decoder_position_ids=None, self_conditioning_logits=None, mask_mapping=None, cache=None,
        finished_denoising=torch.zeros(B, dtype=torch.bool), cur_step=cur_step, sampler=sampler,
        logits_processor=proc, diffusion_stopping_criteria=None,
    )


def test_patched_step_draws_follow_softmax(model, monkeypatch):
    # The decoder forward returns fixed logits; every token is accepted, so the new
    # canvas is the draw. The original step, on the same logits, passes the same test.
    rows, cur_step, steps = 20_000, 5, 10
    row = _logits(2, 8, 3, scale=1.5)[0, 6]
    raw = row.expand(rows // 10, 10, V).contiguous()
    monkeypatch.setattr(DiffusionGemmaForBlockDiffusion, "forward", lambda self, **kw: _Outputs(raw))
    T = 0.4 + 0.4 * cur_step / steps
    probs = ref.canvas_probs(row, T)
    for patched in (False, True):
        p = dg.patch(parts="step") if patched else None
        try:
            torch.manual_seed(11)
            tokens = _run_step(model, raw, cur_step, steps, bound=1e9)[0].flatten()
            counts = torch.bincount(tokens, minlength=V).double()
            assert float(st.chisquare(counts.numpy(), (probs * rows).numpy()).pvalue) > 1e-4
        finally:
            if p is not None:
                p.undo()


def _soft_embedding(model, sc):
    """The signal the decoder's self-conditioning block receives (the soft embedding)."""
    seen = []
    hook = model.model.decoder.self_conditioning.pre_norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        with torch.no_grad():
            model.model.encoder(input_ids=torch.randint(3, 90, (sc_rows(sc), 3)), cache=cache)
            model.model.decoder(decoder_input_ids=torch.randint(0, V, (sc_rows(sc), CANVAS)), cache=cache,
                                self_conditioning_logits=sc)
    finally:
        hook.remove()
    return seen[0]


def sc_rows(sc):
    return (sc.logits if isinstance(sc, dg.SelfConditioning) else sc).shape[0]


def test_soft_embedding_within_the_bf16_bound_of_the_original():
    model = _model(torch.bfloat16, seed=1)
    B, T = 3, 0.45
    raw = _logits(B, CANVAS, 5, scale=10.0)
    E = model.model.decoder.embed_tokens.weight.double()
    scale = float(model.model.decoder.embed_tokens.embed_scale.to(torch.bfloat16))
    orig = _soft_embedding(model, (raw / T).to(torch.bfloat16)).double()  # the original step's copy, unpatched
    with dg.patch():
        ours = _soft_embedding(model, dg.SelfConditioning(raw, torch.full((B,), T, dtype=torch.float64))).double()
    truth = ref.softmax_embed(raw, E, T, scale)
    # what the original computes, in float64: softmax of the bf16-rounded scaled logits
    p_orig = torch.softmax((raw / T).to(torch.bfloat16).double(), -1)
    orig_exact = p_orig @ E * scale
    mag = ref.canvas_probs(raw, T) @ E.abs() * scale
    mag_orig = p_orig @ E.abs() * scale
    ours_bound = 2.0**-8 * mag + 2.0**-8 * truth.abs() + 2.0**-23 * E.abs().amax(0) * scale  # P and h in bf16
    orig_bound = 2.0**-8 * mag_orig + 2.0**-8 * orig_exact.abs()
    assert bool(((ours - truth).abs() <= ours_bound).all())
    assert bool(((orig - orig_exact).abs() <= orig_bound).all())
    assert bool(((ours - orig).abs() <= (truth - orig_exact).abs() + ours_bound + orig_bound).all())
    assert float((ours - orig).abs().max()) > 0  # not the same code path


# ---------------------------------------------------------------------------------------
# generate(): patched vs unpatched
# ---------------------------------------------------------------------------------------


def _generate(model, prompt, seed, **kw):
    torch.manual_seed(seed)
    return model.generate(prompt, pad_token_id=PAD, eos_token_id=EOS, **kw)


def test_generate_greedy_identical(model):
    # t_max tiny: every draw is the argmax; entropy_bound huge: every token accepted.
    # One canvas (the next one would start from a random canvas that the two runs
    # draw from differently advanced generators).
    prompt = torch.randint(3, 90, (6, 5), generator=torch.Generator().manual_seed(0))
    prompt[2, -1] = EOS
    kw = dict(max_new_tokens=CANVAS, max_denoising_steps=6, t_min=0.0, t_max=1e-4,
              sampler_config=G.EntropyBoundSamplerConfig(entropy_bound=1e9), stability_threshold=1,
              confidence_threshold=1e-3)
    want = _generate(model, prompt, 3, **kw)
    with dg.patch():
        got = _generate(model, prompt, 3, **kw)
    assert got.sequences.shape == want.sequences.shape == (6, 5 + CANVAS)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.tokens_per_forward, want.tokens_per_forward, rtol=0, atol=0)


def test_generate_eos_and_pad(model):
    # Two canvases; a model whose logits favour EOS: pad after the first EOS in both
    prompt = torch.randint(3, 90, (8, 4), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=2 * CANVAS, max_denoising_steps=4)
    bias = torch.zeros(V)
    bias[EOS] = 4.0
    handle = model.lm_head.register_forward_hook(lambda m, a, out: out + bias.to(out.dtype))
    try:
        outs = [_generate(model, prompt, 5, **kw)]
        with dg.patch():
            outs.append(_generate(model, prompt, 5, **kw))
    finally:
        handle.remove()
    for out in outs:
        new = out.sequences[:, 4:]
        assert out.sequences.shape[0] == 8 and new.shape[1] in (CANVAS, 2 * CANVAS)
        for row in new.tolist():
            if EOS in row:
                first = row.index(EOS)
                assert all(t == PAD for t in row[first + 1:]), row
        valid = (new != PAD).sum(-1)
        assert bool((out.tokens_per_forward > 0).all()) and bool((valid > 0).all())


SEEDS = 4


def test_tokens_per_forward_laws_agree():
    # Random draws and renoising: the number of decoder passes per row (which sets
    # tokens_per_forward) has a law; patched and unpatched agree by chi-square
    # on the counts of each value (rows pooled over seeds).
    # A peakier model (the tied embedding scaled up): row mean entropies ~0.9 at T = 0.6,
    # so that the stopping criterion fires after a random number of steps.
    model = _model(seed=0)
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.mul_(6.25)
    prompt = torch.randint(3, 90, (64, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=CANVAS, max_denoising_steps=8, t_min=0.4, t_max=0.8,
              sampler_config=G.EntropyBoundSamplerConfig(entropy_bound=0.3), stability_threshold=0,
              confidence_threshold=0.8)
    laws, runs = [], []
    for patched in (False, True):
        p = dg.patch() if patched else None
        try:
            outs = [_generate(model, prompt, s, **kw) for s in range(SEEDS)]
        finally:
            if p is not None:
                p.undo()
        valid = torch.cat([(o.sequences[:, 4:] != PAD).sum(-1) for o in outs])
        tpf = torch.cat([o.tokens_per_forward for o in outs])
        laws.append(torch.round(valid / tpf).long())  # decoder passes per row
        runs.append(outs[0].sequences)
    assert not torch.equal(runs[0], runs[1])  # other draws, the same law:
    values = sorted(set(torch.cat(laws).tolist()))
    assert len(values) >= 4, values  # a law worth testing
    table = [[int((law == v).sum()) for v in values] for law in laws]
    keep = [i for i in range(len(values)) if table[0][i] + table[1][i] >= 10]
    table = [[row[i] for i in keep] for row in table]
    assert float(st.chi2_contingency(table).pvalue) > 1e-4, (values, table)


# ---------------------------------------------------------------------------------------
# what keeps the original, undo, double patching
# ---------------------------------------------------------------------------------------


class _Identity(LogitsProcessor):
    def __call__(self, input_ids, scores, cur_step=None):
        return scores


class _LogitsStreamer:
    _takes_logits = True

    def __init__(self):
        self.drafts = []

    def put(self, value):
        pass

    def put_draft(self, value=None, logits=None):
        self.drafts.append(logits)

    def end(self):
        pass


def test_uncovered_calls_keep_the_original_with_one_log_line(model, patched, caplog):
    dg._logged.clear()
    prompt = torch.randint(3, 90, (3, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=CANVAS, max_denoising_steps=3)
    with caplog.at_level(logging.WARNING, logger="duo_fast.integrations.diffusion_gemma"):
        got = _generate(model, prompt, 7, logits_processor=LogitsProcessorList([_Identity()]), **kw)
        _generate(model, prompt, 7, logits_processor=LogitsProcessorList([_Identity()]), **kw)
        streamer = _LogitsStreamer()
        _generate(model, prompt, 7, streamer=streamer, **kw)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("user logits processor (_Identity" in m for m in lines) == 1, lines  # once
    assert sum("streamer asks for the self-conditioning logits" in m for m in lines) == 1, lines
    assert streamer.drafts and all(d.shape == (3, CANVAS, V) and d.dtype == torch.float32 for d in streamer.drafts)
    patched.undo()
    want = _generate(model, prompt, 7, logits_processor=LogitsProcessorList([_Identity()]), **kw)
    assert torch.equal(got.sequences, want.sequences)  # the original step (same draws)


def test_undo_restores_every_object_and_no_double_patch(caplog):
    owners = [(G.DiffusionGemmaGenerationMixin, "_denoising_step"), (G.DiffusionGemmaGenerationMixin, "generate"),
              (M.DiffusionGemmaDecoderModel, "forward"), (M.DiffusionGemmaSelfConditioning, "forward")]
    before = [o.__dict__[n] for o, n in owners]
    with caplog.at_level(logging.INFO, logger="duo_fast.integrations.diffusion_gemma"):
        p = dg.patch(module=G)
    assert [r for r in caplog.records if "patched DiffusionGemma" in r.getMessage()], caplog.records
    assert all(o.__dict__[n] is not b for (o, n), b in zip(owners, before))
    with pytest.raises(RuntimeError, match="already patched"):
        dg.patch()
    p.undo()
    assert all(o.__dict__[n] is b for (o, n), b in zip(owners, before))
    with dg.patch(parts=["soft_embedding"]) as q:
        assert q.replaced == ["transformers.models.diffusion_gemma.modeling_diffusion_gemma.DiffusionGemmaDecoderModel.forward",
                              "transformers.models.diffusion_gemma.modeling_diffusion_gemma.DiffusionGemmaSelfConditioning.forward"]
    assert all(o.__dict__[n] is b for (o, n), b in zip(owners, before))
    with pytest.raises(ValueError, match="parts must be"):
        dg.patch(parts=["sampling"])
    with pytest.raises(RuntimeError, match="is not transformers' models.diffusion_gemma"):
        dg.patch(module=math)


def test_step_alone_hands_on_the_originals_copy(model):
    # parts="step" without the soft embedding: the unpatched decoder gets a tensor
    prompt = torch.randint(3, 90, (2, 4), generator=torch.Generator().manual_seed(4))
    with dg.patch(parts="step"):
        out = _generate(model, prompt, 1, max_new_tokens=CANVAS, max_denoising_steps=3)
    assert out.sequences.shape == (2, 4 + CANVAS)
