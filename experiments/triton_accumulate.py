"""Can a custom kernel make the in-place accumulation ``y += alpha · h Bᵀ`` faster than cuBLAS's ``addmm_``? (GPU)

The pass that nlora's node adds twice per projection (forward into the output, backward into the input gradient),
at 8,192 tokens, bf16, r = 128 (and 256: two terms in one pass): a copy of ``y`` (the bandwidth ceiling), cuBLAS's
``addmm_`` (also transposed, and with cuBLASLt preferred), a fresh ``mm`` (no read of ``y``) and a Triton kernel
(load the ``y`` tile, ``tl.dot`` over K, add, store) with its tile sizes, K step, warps and stages searched. Prints
the max error of Triton and cuBLAS against an fp32 reference, then µs (``gemm_passes.microseconds``) and GB/s
(2 · |y| bytes) per variant.
Result (H200, torch 2.11, Triton 3.6): ``experiments/results/triton_accumulate.txt``.

  python3 -m experiments.triton_accumulate
"""

import sys

import torch
import triton
import triton.language as tl

from benchmarks.gemm_passes import microseconds

torch.manual_seed(0)


@triton.jit
def _rmw(C, L, R, M, N, K, scm, slm, slk, srk, srn, alpha,
         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    npm = tl.cdiv(M, BM)
    npn = tl.cdiv(N, BN)
    width = GROUP * npn
    first = (pid // width) * GROUP
    gs = min(npm - first, GROUP)
    pm = first + (pid % width) % gs
    pn = (pid % width) // gs
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    cp = C + rm[:, None] * scm + rn[None, :]
    c = tl.load(cp, mask=mask, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        rk = k + tl.arange(0, BK)
        l = tl.load(L + rm[:, None] * slm + rk[None, :] * slk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        r = tl.load(R + rk[:, None] * srk + rn[None, :] * srn, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(l, r, acc)
    tl.store(cp, (c.to(tl.float32) + alpha * acc).to(C.dtype.element_ty), mask=mask)


def rmw(c, l, r, alpha, BM, BN, BK, w, s, G=8):
    """``c += alpha · l @ r`` in place by the Triton kernel."""
    M, N = c.shape
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _rmw[grid](c, l, r, M, N, l.shape[1], c.stride(0), l.stride(0), l.stride(1), r.stride(0), r.stride(1), alpha,
               BM=BM, BN=BN, BK=BK, GROUP=G, num_warps=w, num_stages=s)


def main():
    T = 8192
    for n_out, rr in ((4096, 128), (11008, 128), (4096, 256)):
        new = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        y, h, b = new(T, n_out), new(T, rr), new(n_out, rr)
        z = torch.empty_like(y)
        gb = 2 * y.numel() * 2 / 1e9
        res = {"copy": microseconds(lambda: z.copy_(y), 7),
               "addmm_": microseconds(lambda: y.addmm_(h, b.t(), alpha=0.5), 7),
               "addmm_ T": microseconds(lambda: y.t().addmm_(b, h.t(), alpha=0.5), 7),
               "mm fresh": microseconds(lambda: torch.mm(h, b.t()), 7)}
        ref = y.float() + 0.5 * (h.float() @ b.float().t())
        y2 = y.clone()
        rmw(y2, h, b.t(), 0.5, 128, 128, 64, 8, 3)
        y3 = y.clone()
        y3.addmm_(h, b.t(), alpha=0.5)
        print("err triton", (y2.float() - ref).abs().max().item(), "err cublas", (y3.float() - ref).abs().max().item(),
              "diff", (y2 != y3).float().mean().item())
        best = None
        for BM in (64, 128, 256):
            for BN in (64, 128, 256):
                for BK in (32, 64, 128):
                    for w in (4, 8):
                        for s in (1, 2, 3):
                            if BM * BN > 128 * 256 or (BM * BK + BK * BN) * 2 * s > 200_000:
                                continue
                            try:
                                t = microseconds(lambda: rmw(y, h, b.t(), 0.5, BM, BN, BK, w, s), 3)
                            except Exception:  # a configuration that does not fit (shared memory, registers)
                                continue
                            if best is None or t < best[0]:
                                best = (t, BM, BN, BK, w, s)
        res["triton best %s" % (best[1:],)] = microseconds(lambda: rmw(y, h, b.t(), 0.5, *best[1:]), 7)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        res["addmm_ cublaslt"] = microseconds(lambda: y.addmm_(h, b.t(), alpha=0.5), 7)
        torch.backends.cuda.preferred_blas_library("cublas")
        print(f"--- y {T}x{n_out} += ({T}x{rr})({rr}x{n_out})")
        for k, v in res.items():
            print(f"{k:40s} {v:8.1f} us  {gb / v * 1e6:7.0f} GB/s")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
