"""One small call of every duo_fast kernel, forward and backward (GPU check, step
"sanitizer": run under `compute-sanitizer --tool memcheck` and `--tool racecheck`).

    python -m duo_fast.bench.gpu_sanitize [--device cuda|cpu]

Every CUDA kernel of csrc/cuda/*.cu is reached: gamma_to_alpha (float32, float64),
sample_zt (single, coupled), usdm_loss (fp32 / bf16 / fp16 logits, with and
without the gradient, a masked id), linear_usdm_loss (per token and reduced),
distill_kl (both directions, with the gradient; 16-bit where the op takes it; the
in-place gradient), sample_step and
posterior (fp32 / bf16 logits, top_p = 1 and the nucleus path, kappa < 1),
linear_sample_step (row chunks: sample_step's row_offset; guidance: posterior),
linear_distill_kl (per token and reduced),
curriculum_embed (forward and backward; the float kernels and the three
tensor-core block shapes), curriculum_topk, curriculum_topk_embed
(forward, the atomic and the sorted (deterministic) bag backward), canvas_step
(fp32 / bf16 / fp16 logits, per-row temperature, -inf entries, K = 262,144),
softmax_embed (the three tensor-core block shapes, the float kernel for fp32,
fp16 and bf16 embeddings, confident rows whose empty tiles are skipped). Sizes are
small (K = 1000 and one row of K = 50257, a few tokens) and odd, so tails and
partial tiles are exercised. Prints one line per call and `SANITIZE_CALLS_OK n`
at the end; exits 1 when a call raised (the error is printed). On the CPU (the
dry run) the same calls run on the CPU kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

import torch

import duo_fast


def calls(device: str):
    """(name, thunk) for every kernel; each thunk makes its inputs and calls the op."""
    g = torch.Generator(device=device).manual_seed(123)

    def rn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    def ids(K, *shape):
        return torch.randint(0, K, shape, generator=g, device=device)

    def levels(B):
        return -3.5 + 1.75 * torch.rand(B, generator=g, device=device, dtype=torch.float64)

    out = []
    for dt in (torch.float32, torch.float64):
        out.append((f"gamma_to_alpha {dt}", lambda dt=dt: duo_fast.gamma_to_alpha(
            torch.linspace(-20, 20, 37, device=device, dtype=dt), 50257)))
    out.append(("sample_zt single", lambda: duo_fast.sample_zt(ids(1000, 3, 33), levels(3), 1000, seed=1)))
    out.append(("sample_zt coupled", lambda: duo_fast.sample_zt(ids(1000, 3, 33), levels(3), 1000,
                                                                   gamma_s=levels(3) - 1.0, seed=2)))

    def loss(K, dt, grad, B=2, L=7):
        def f():
            logits = rn(B, L, K, dtype=dt)
            logits[0, 0, 5] = float("-inf")  # a masked id
            logits.requires_grad_(grad)
            alpha, dalpha = duo_fast.gamma_to_alpha(levels(B), K)
            x0 = ids(K, B, L)
            z = torch.where(torch.rand(B, L, generator=g, device=device) < 0.5, x0, ids(K, B, L))
            val = duo_fast.usdm_loss(logits, z, x0, alpha.float()[:, None], 1.75 * dalpha.float()[:, None],
                                     inplace_grad=grad)
            if grad:
                val.sum().backward()
            return val
        return f

    for K in (1000, 50257):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for grad in (False, True):
                if K == 50257 and (dt == torch.float16 or not grad):
                    continue
                out.append((f"usdm_loss K={K} {dt} grad={grad}", loss(K, dt, grad, B=1 if K > 1000 else 2,
                                                                       L=3 if K > 1000 else 7)))

    def linear(reduction):
        def f():
            B, L, d, K = 2, 5, 16, 1000
            h = rn(B, L, d).requires_grad_(True)
            W = rn(K, d).requires_grad_(True)
            b = rn(K).requires_grad_(True)
            alpha, dalpha = duo_fast.gamma_to_alpha(levels(B), K)
            x0 = ids(K, B, L)
            v = duo_fast.linear_usdm_loss(h, W, b, x0, x0, alpha.float()[:, None], 1.75 * dalpha.float()[:, None],
                                          chunk_size=3, reduction=reduction)
            (v.sum() if reduction == "none" else v * 2).backward()  # "mean": gradients in the forward, scaled
        return f

    out.append(("linear_usdm_loss", linear("none")))
    out.append(("linear_usdm_loss reduction=mean", linear("mean")))

    def kl(direction, dt, K=1000, inplace=False):
        def f():
            s = rn(2, 5, K, dtype=dt).requires_grad_(True)
            t = rn(2, 5, K, dtype=dt)
            v = duo_fast.distill_kl(s, t, direction, inplace_grad=inplace)
            (v * rn(2, 5)).sum().backward()  # a grad_output that is not 1: the scaling runs
            return v
        return f

    for direction in ("bwd", "fwd"):
        out.append((f"distill_kl {direction} fp32", kl(direction, torch.float32)))
        out.append((f"distill_kl {direction} K=50257 fp32", kl(direction, torch.float32, 50257)))
        out.append((f"distill_kl {direction} bf16 (where the op takes 16-bit logits)", kl(direction, torch.bfloat16)))
    out.append(("distill_kl bwd bf16 inplace_grad (rows scaled through a float32 buffer)",
                kl("bwd", torch.bfloat16, inplace=True)))

    def step(dt, top_p, kappa, K=1000, op="sample_step"):
        def f():
            B, L = 2, 9
            logits = rn(B, L, K, dtype=dt) * 2
            z = ids(K, B, L)
            at = torch.full((B, 1), 0.3, dtype=torch.float64, device=device)
            as_ = torch.full((B, 1), 0.6, dtype=torch.float64, device=device)
            if op == "sample_step":
                return duo_fast.sample_step(logits, z, at, as_, kappa=kappa, top_p=top_p, seed=5)
            return duo_fast.posterior(logits, z, at, as_, kappa=kappa, top_p=top_p)
        return f

    for op in ("sample_step", "posterior"):
        for dt in (torch.float32, torch.bfloat16):
            for top_p, kappa in ((1.0, 1.0), (0.9, 0.5)):
                out.append((f"{op} {dt} top_p={top_p} kappa={kappa}", step(dt, top_p, kappa, op=op)))
    out.append(("sample_step K=50257", step(torch.float32, 1.0, 1.0, K=50257)))

    def linear_step(guided, top_p=1.0, kappa=1.0):
        # chunks of 4 rows: sample_step with row_offset > 0; guided: posterior x 2 (x 4 for kappa < 1)
        def f():
            B, L, d, K = 2, 9, 16, 1000
            h, W, b = rn(B, L, d), rn(K, d), rn(K)
            at = torch.full((B, 1), 0.3, dtype=torch.float64, device=device)
            as_ = torch.full((B, 1), 0.6, dtype=torch.float64, device=device)
            return duo_fast.linear_sample_step(h, W, b, ids(K, B, L), at, as_, kappa=kappa, top_p=top_p, seed=6,
                                               chunk_size=4, guidance=(rn(B, L, d), 2.0) if guided else None)
        return f

    out.append(("linear_sample_step top_p=0.9 (row_offset)", linear_step(False, top_p=0.9)))
    out.append(("linear_sample_step guidance kappa=0.5", linear_step(True, kappa=0.5)))

    def linear_kl(direction, reduction):
        def f():
            B, L, d, K = 2, 5, 16, 1000
            h, W, b = rn(B, L, d).requires_grad_(True), rn(K, d).requires_grad_(True), rn(K).requires_grad_(True)
            v = duo_fast.linear_distill_kl(h, W, b, rn(B, L, 12), rn(K, 12), None, direction, chunk_size=3,
                                           reduction=reduction)
            ((v * rn(B, L)).sum() if reduction == "none" else v * 2).backward()
        return f

    out.append(("linear_distill_kl bwd", linear_kl("bwd", "none")))
    out.append(("linear_distill_kl fwd reduction=mean", linear_kl("fwd", "mean")))

    @contextlib.contextmanager
    def kernels(portable):
        # DUO_FAST_EMBED_PORTABLE (read per call): the float kernels, else the tensor-core
        # kernels on sm_80+ (curriculum_embed_mma.cu, softmax_embed.cu; d picks the block
        # shape: <= 128, <= 256, more)
        old = os.environ.get("DUO_FAST_EMBED_PORTABLE")
        os.environ["DUO_FAST_EMBED_PORTABLE"] = "1" if portable else "0"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("DUO_FAST_EMBED_PORTABLE", None)
            else:
                os.environ["DUO_FAST_EMBED_PORTABLE"] = old

    def embed(K=1000, d=24, portable=False):
        def f():
            with kernels(portable):
                E = (0.02 * rn(K, d)).requires_grad_(True)
                h, z = duo_fast.curriculum_embed(ids(K, 2, 11), levels(2), 10.0, E, seed=7)
                h.sum().backward()
                return z
        return f

    out.append(("curriculum_embed fwd+bwd (float kernels)", embed(portable=True)))
    out.append(("curriculum_embed fwd+bwd d=24 (tensor cores on sm_80+)", embed()))
    out.append(("curriculum_embed fwd+bwd d=200 (tensor cores, 2 x 128 columns)", embed(d=200)))
    out.append(("curriculum_embed fwd+bwd d=300 (tensor cores, 2 x 192 columns)", embed(d=300)))
    out.append(("curriculum_topk k=7", lambda: duo_fast.curriculum_topk(ids(1000, 2, 11), levels(2), 10.0, 7, 1000,
                                                                          seed=8)))

    def topk_embed(k, deterministic):
        def f():
            E = (0.02 * rn(1000, 24)).requires_grad_(True)
            prev = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                h, z = duo_fast.curriculum_topk_embed(ids(1000, 2, 11), levels(2), 10.0, k, E, seed=9)
                h.sum().backward()
            finally:
                torch.use_deterministic_algorithms(prev)
            return z
        return f

    out.append(("curriculum_topk_embed k=7 (atomic bag backward)", topk_embed(7, False)))
    out.append(("curriculum_topk_embed k=300 (sorted bag backward)", topk_embed(300, True)))
    def canvas(dt, K, per_row):
        def f():
            logits = rn(2, 9, K, dtype=dt) * 3
            logits[0, 1, ::3] = float("-inf")
            t = (0.3 + torch.rand(2, 9, generator=g, device=device, dtype=torch.float64)) if per_row else 0.6
            return duo_fast.canvas_step(logits, temperature=t, seed=10)
        return f

    out.append(("canvas_step fp32 per-row temperature", canvas(torch.float32, 1000, True)))
    out.append(("canvas_step bf16", canvas(torch.bfloat16, 1000, False)))
    out.append(("canvas_step fp16 K=262144", canvas(torch.float16, 262_144, False)))

    def soft(emb_dt, d, K=1000, portable=False, confident=False):
        # bf16 E on tensor cores unless portable; float32 / float16 E: the float kernel.
        # Confident rows skip empty tiles.
        def f():
            with kernels(portable):
                logits = rn(3, 23, K) * 2
                if confident:
                    logits -= 100.0
                    logits[..., 7] = 0.0
                E = (0.02 * rn(K, d)).to(emb_dt)
                return duo_fast.softmax_embed(logits, E, temperature=0.7, scale=3.0)
        return f

    out.append(("softmax_embed bf16 E d=24 (tensor cores on sm_80+)", soft(torch.bfloat16, 24)))
    out.append(("softmax_embed bf16 E d=200 (tensor cores, 2 x 128 columns)", soft(torch.bfloat16, 200)))
    out.append(("softmax_embed bf16 E d=300 (tensor cores, 2 x 192 columns), confident rows",
                soft(torch.bfloat16, 300, confident=True)))
    out.append(("softmax_embed bf16 E d=300 (the float kernel)", soft(torch.bfloat16, 300, portable=True)))
    out.append(("softmax_embed fp32 E d=40", soft(torch.float32, 40)))
    out.append(("softmax_embed fp16 E d=300 confident rows", soft(torch.float16, 300, confident=True)))
    out.append(("check_device_errors", lambda: duo_fast.check_device_errors(device)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("sanitize_calls: no CUDA device", file=sys.stderr)
        return 2
    failed = 0
    n = 0
    for name, thunk in calls(args.device):
        try:
            thunk()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            n += 1
            print(f"call ok: {name}", flush=True)
        except TypeError as e:
            # an op that does not take this dtype (yet): not a kernel call
            if "dtype" in str(e) and ("bf16" in name or "bfloat16" in name):
                print(f"call skipped: {name}: {e}", flush=True)
            else:
                failed += 1
                print(f"call FAILED: {name}: {type(e).__name__}: {e}", flush=True)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"call FAILED: {name}: {type(e).__name__}: {e}\n{traceback.format_exc()}", flush=True)
    print(f"SANITIZE_CALLS_OK {n}" if not failed else f"SANITIZE_CALLS_FAILED {failed} of {n + failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
