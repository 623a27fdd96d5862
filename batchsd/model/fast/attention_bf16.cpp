// Fused scaled-dot-product attention for bf16 tensors on CPUs with AVX512-BF16 (VDPBF16PS), built
// and loaded by fused_attention.py. softmax(q k^T * scale) v per (batch, head), in three steps per
// block of QB query rows: scores in fp32 (bf16 pairs multiplied and summed by VDPBF16PS), softmax in
// fp32, the probabilities rounded to bf16 and multiplied with v by VDPBF16PS, fp32 sums rounded to
// bf16 once (round to nearest even). torch's CPU flash kernel rounds the same two places.
//
// Invariants the callers rely on:
// * a query row's result depends on that row, its (batch, head)'s k and v and the shapes only: work
//   items are (batch, head, block of QB rows) with fixed blocking and summation order, so the bits do
//   not depend on the thread count nor on the other rows of the batch (exact mode, fast/exact.py);
// * no -ffast-math and -ffp-contract=off (fused_attention.FLAGS), and the one horizontal sum written
//   out (lane_sum): the compiler keeps the written order of every floating-point operation, so the
//   bits depend on this source and the CPU's instructions, not on the compiler's version.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef uint16_t bf16;

static const int QB = 24;   // query rows per work item: a multiple of every PV row block below

static inline __m512 exp512(__m512 x) {
    // Cephes expf: e^x = 2^n e^r, n = round(x log2 e), r = x - n ln 2 in two parts, |r| <= ln2/2.
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

// The 16 lanes added in a fixed order written here (not a header's reduction, whose order may
// differ between compilers), so the bits do not depend on the compiler.
static inline float lane_sum(__m512 v) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, v);
    float total = 0.0f;
    for (int i = 0; i < 16; i++) total += lanes[i];
    return total;
}

static inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// S[r][j] = scale * sum_d Q[r][d] K[j][d] for R rows and C blocks of 16 keys.
// q32: the rows' d-pairs as 32-bit words [QB][DP]; kp: the first key block, blocks kstride apart.
template <int R, int C>
static inline void qk_tile(const int32_t* q32, int DP, const bf16* kp, int64_t kstride, float* s, int64_t NK, __m512 scale) {
    __m512 acc[R][C];
    for (int r = 0; r < R; r++) for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    for (int p = 0; p < DP; p++) {
        __m512i kv[C];
        for (int c = 0; c < C; c++) kv[c] = _mm512_loadu_si512((const void*)(kp + c * kstride + p * 32));
        for (int r = 0; r < R; r++) {
            __m512i b = _mm512_set1_epi32(q32[r * DP + p]);
            for (int c = 0; c < C; c++) acc[r][c] = dp(acc[r][c], b, kv[c]);
        }
    }
    for (int r = 0; r < R; r++) for (int c = 0; c < C; c++)
        _mm512_storeu_ps(s + r * NK + c * 16, _mm512_mul_ps(acc[r][c], scale));
}

// O[r][:] = rinv[r] * sum_j P[r][j] V[j][:] for R rows and NV blocks of 16 head channels.
template <int R, int NV>
static inline void pv_tile(const int32_t* p32, int64_t NP, const bf16* vp, int DV, const float* rinv,
                           bf16* o, int64_t os, int D) {
    __m512 acc[R][NV];
    for (int r = 0; r < R; r++) for (int n = 0; n < NV; n++) acc[r][n] = _mm512_setzero_ps();
    for (int64_t p = 0; p < NP; p++) {
        __m512i vv[NV];
        for (int n = 0; n < NV; n++) vv[n] = _mm512_loadu_si512((const void*)(vp + p * DV * 2 + n * 32));
        for (int r = 0; r < R; r++) {
            __m512i b = _mm512_set1_epi32(p32[r * NP + p]);
            for (int n = 0; n < NV; n++) acc[r][n] = dp(acc[r][n], b, vv[n]);
        }
    }
    for (int r = 0; r < R; r++) {
        __m512 inv = _mm512_set1_ps(rinv[r]);
        for (int n = 0; n < NV; n++) {
            __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][n], inv));
            int left = D - n * 16;
            __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            _mm256_mask_storeu_epi16((void*)(o + r * os + n * 16), m, h);
        }
    }
}

template <int NV>
static void pv_rows(const int32_t* p32, int64_t NP, const bf16* vp, int DV, const float* rinv,
                    bf16* o, int64_t os, int D, int rows) {
    constexpr int R = NV <= 3 ? 8 : NV == 4 ? 6 : NV == 5 ? 4 : NV <= 7 ? 3 : NV <= 10 ? 2 : 1;
    int r0 = 0;
    for (; r0 + R <= rows; r0 += R) pv_tile<R, NV>(p32 + r0 * NP, NP, vp, DV, rinv + r0, o + r0 * os, os, D);
    for (; r0 < rows; r0++) pv_tile<1, NV>(p32 + r0 * NP, NP, vp, DV, rinv + r0, o + r0 * os, os, D);
}

typedef void (*pv_fn)(const int32_t*, int64_t, const bf16*, int, const float*, bf16*, int64_t, int, int);
static const pv_fn PV[17] = {nullptr, pv_rows<1>, pv_rows<2>, pv_rows<3>, pv_rows<4>, pv_rows<5>, pv_rows<6>,
    pv_rows<7>, pv_rows<8>, pv_rows<9>, pv_rows<10>, pv_rows<11>, pv_rows<12>, pv_rows<13>, pv_rows<14>,
    pv_rows<15>, pv_rows<16>};

// softmax(q k^T * scale) v over [B, H, L, D] bf16 views: strides in elements for b, h, l; the last
// dimension contiguous. D even, D <= 256. Returns 0, or 1 when memory ran out.
extern "C" int batchsd_attention_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out,
                                      int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D,
                                      const int64_t* qs, const int64_t* ks, const int64_t* vs, const int64_t* os,
                                      float scale, int nthreads) {
    if (D % 2 || D > 256 || Lk < 1) return 2;
    const int64_t NK = (Lk + 15) / 16 * 16, DP = D / 2, DV = (D + 15) / 16 * 16, NV = DV / 16, BH = B * H;
    bf16* kpack = (bf16*)aligned_alloc(64, BH * NK * D * sizeof(bf16));
    bf16* vpack = (bf16*)aligned_alloc(64, BH * NK * DV * sizeof(bf16));
    if (!kpack || !vpack) { free(kpack); free(vpack); return 1; }
    int failed = 0;
    // 1. Pack K as [key block of 16][d pair][16 keys][2] and V as [key pair][DV][2] per (b, h), zero-padded.
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bh = 0; bh < BH; bh++) {
        const int64_t b = bh / H, h = bh % H;
        bf16* kp = kpack + bh * NK * D;
        bf16* vp = vpack + bh * NK * DV;
        memset(kp, 0, NK * D * sizeof(bf16));
        memset(vp, 0, NK * DV * sizeof(bf16));
        for (int64_t j = 0; j < Lk; j++) {
            const bf16* kr = k + b * ks[0] + h * ks[1] + j * ks[2];
            const bf16* vr = v + b * vs[0] + h * vs[1] + j * vs[2];
            bf16* kb = kp + (j / 16) * 16 * D + (j % 16) * 2;
            for (int64_t d = 0; d < D; d++) kb[(d / 2) * 32 + (d % 2)] = kr[d];
            bf16* vb = vp + (j / 2) * DV * 2 + (j % 2);
            for (int64_t d = 0; d < D; d++) vb[d * 2] = vr[d];
        }
    }
    const int64_t nqb = (Lq + QB - 1) / QB;
    const __m512 vscale = _mm512_set1_ps(scale);
    // 2. Per (b, h, block of QB query rows): scores, softmax in fp32, probabilities in bf16, P V.
    #pragma omp parallel num_threads(nthreads)
    {
        int32_t* q32 = (int32_t*)aligned_alloc(64, QB * DP * sizeof(int32_t));
        float* s = (float*)aligned_alloc(64, QB * NK * sizeof(float));
        bf16* pr = (bf16*)aligned_alloc(64, QB * NK * sizeof(bf16));
        float* rinv = (float*)aligned_alloc(64, QB * sizeof(float));
        if (!q32 || !s || !pr || !rinv) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < BH * nqb; item++) {
            if (!q32 || !s || !pr || !rinv) continue;
            const int64_t bh = item / nqb, i0 = (item % nqb) * QB, b = bh / H, h = bh % H;
            const int rows = (int)(Lq - i0 < QB ? Lq - i0 : QB);
            memset(q32, 0, QB * DP * sizeof(int32_t));
            for (int r = 0; r < rows; r++)
                memcpy(q32 + r * DP, q + b * qs[0] + h * qs[1] + (i0 + r) * qs[2], D * sizeof(bf16));
            const bf16* kp = kpack + bh * NK * D;
            for (int r0 = 0; r0 < QB; r0 += 4) {
                int64_t jb = 0;
                for (; jb + 4 <= NK / 16; jb += 4)
                    qk_tile<4, 4>(q32 + r0 * DP, DP, kp + jb * 16 * D, 16 * D, s + r0 * NK + jb * 16, NK, vscale);
                for (; jb < NK / 16; jb++)
                    qk_tile<4, 1>(q32 + r0 * DP, DP, kp + jb * 16 * D, 16 * D, s + r0 * NK + jb * 16, NK, vscale);
            }
            for (int r = 0; r < rows; r++) {
                float* sr = s + r * NK;
                bf16* prr = pr + r * NK;
                __m512 mx = _mm512_set1_ps(-3.0e38f);
                int64_t j = 0;
                for (; j + 16 <= Lk; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + j));
                __mmask16 tail = (__mmask16)((1u << (Lk - j)) - 1);
                if (Lk - j) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, sr + j));
                const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
                __m512 sum = _mm512_setzero_ps();
                for (j = 0; j + 16 <= Lk; j += 16) {
                    __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), m));
                    sum = _mm512_add_ps(sum, e);
                    _mm256_storeu_si256((__m256i*)(prr + j), (__m256i)_mm512_cvtneps_pbh(e));
                }
                if (Lk - j) {
                    __m512 e = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sr + j), m)));
                    sum = _mm512_add_ps(sum, e);
                    _mm256_storeu_si256((__m256i*)(prr + j), (__m256i)_mm512_cvtneps_pbh(e));
                }
                rinv[r] = 1.0f / lane_sum(sum);
            }
            PV[NV]((const int32_t*)pr, NK / 2, vpack + bh * NK * DV, (int)DV, rinv,
                   out + b * os[0] + h * os[1] + i0 * os[2], os[2], (int)D, rows);
        }
        free(q32); free(s); free(pr); free(rinv);
    }
    free(kpack); free(vpack);
    return failed;
}
