// Fused scaled-dot-product attention for bf16 tensors on CPUs with AMX (TDPBF16PS tiles), built and
// loaded by fused_attention.py. The same three steps per block of query rows as attention_bf16.cpp
// (scores in fp32, softmax in fp32, probabilities rounded to bf16 and multiplied with v, fp32 sums
// rounded to bf16 once), with both products on the tile unit: 16 x 16 fp32 tiles, each the sum over
// 32 bf16 values (16 pairs) per instruction.
//
// Invariants the callers rely on (as attention_bf16.cpp):
// * a query row's result depends on that row, its (batch, head)'s k and v and the shapes only: work
//   items are (batch, head, block of QB rows) with fixed blocking and summation order, and tile rows
//   are independent, so the bits do not depend on the thread count nor on the other rows of the batch;
// * no -ffast-math and -ffp-contract=off, the horizontal sum written out (lane_sum): the bits depend
//   on this source and the CPU's instructions, not on the compiler's version.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef uint16_t bf16;

static const int QB = 32;   // query rows per work item: two tile rows of 16
static const int KC = 32;   // bf16 values summed per tile row and instruction (64 bytes)

// Tiles: 0-3 accumulators (2 row blocks x 2 column blocks), 4-5 the left operands (the 2 row blocks),
// 6-7 the right operands (the 2 column blocks); all 16 rows of 64 bytes.
struct TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static void configure_tiles() {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
    _tile_loadconfig(&cfg);
}

// e^((s - m) * scale) as 2^t with t = s * c - m * c, c = scale * log2(e): t = n + f, n an integer,
// |f| <= 1/2, 2^f by a degree-5 polynomial fitted for relative error (about fp32's own rounding on
// [-1/2, 1/2]), scaled by 2^n. Fewer operations than Cephes' e^x (attention_bf16.cpp): the softmax
// runs on the vector units, beside the tiles (its share of the time: docs/performance.md).
static inline __m512 exp2_scaled(__m512 s, __m512 c, __m512 neg_mc) {
    const __m512 t = _mm512_fmadd_ps(s, c, neg_mc);
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 y = _mm512_set1_ps(0.0013264731969684362f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.009671512991189957f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.05550733581185341f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.24022242426872253f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.6931470036506653f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

static inline float lane_sum(__m512 v) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, v);
    float total = 0.0f;
    for (int i = 0; i < 16; i++) total += lanes[i];
    return total;
}

// C[32 rows][2 x 16 columns] = sum over `steps` of A (two 16-row blocks at a, a + 16 * lda) times
// B (two blocks at b0, b1, each 16 pairs of rows x 16 columns), stored to c (row stride ldc floats).
// a_step / b_step: the elements from one step's operands to the next's.
static inline void tile_2x2(const bf16* a, int64_t lda, int64_t a_step, const bf16* b0, const bf16* b1,
                            int64_t ldb, int64_t b_step, int64_t steps, float* c, int64_t ldc) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t s = 0; s < steps; s++) {
        _tile_loadd(4, a + s * a_step, lda * 2);
        _tile_loadd(5, a + 16 * lda + s * a_step, lda * 2);
        _tile_loadd(6, b0 + s * b_step, ldb * 2);
        _tile_loadd(7, b1 + s * b_step, ldb * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, ldc * 4);
    _tile_stored(1, c + 16, ldc * 4);
    _tile_stored(2, c + 16 * ldc, ldc * 4);
    _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

// The same with one column block (the last of an odd count).
static inline void tile_2x1(const bf16* a, int64_t lda, int64_t a_step, const bf16* b0,
                            int64_t ldb, int64_t b_step, int64_t steps, float* c, int64_t ldc) {
    _tile_zero(0); _tile_zero(2);
    for (int64_t s = 0; s < steps; s++) {
        _tile_loadd(4, a + s * a_step, lda * 2);
        _tile_loadd(5, a + 16 * lda + s * a_step, lda * 2);
        _tile_loadd(6, b0 + s * b_step, ldb * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
    }
    _tile_stored(0, c, ldc * 4);
    _tile_stored(2, c + 16 * ldc, ldc * 4);
}

// Linux hands out AMX tile state only on request, per process (torch's oneDNN asks too).
static int request_tiles() {
    const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : 3;
}

// softmax(q k^T * scale) v over [B, H, L, D] bf16 views: strides in elements for b, h, l; the last
// dimension contiguous. D even, D <= 256. Returns 0, 1 when memory ran out, 3 when the kernel may
// not use the tiles.
extern "C" int batchsd_attention_amx(const bf16* q, const bf16* k, const bf16* v, bf16* out,
                                     int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D,
                                     const int64_t* qs, const int64_t* ks, const int64_t* vs, const int64_t* os,
                                     float scale, int nthreads) {
    if (D % 2 || D > 256 || Lk < 1) return 2;
    static const int tiles_refused = request_tiles();   // once per process
    if (tiles_refused) return 3;
    // keys padded to 32 (one probability tile row), channels to 32 for Q K^T and to 16 for P V
    const int64_t NK = (Lk + 31) / 32 * 32, DQ = (D + 31) / 32 * 32, NC = DQ / KC,
                  DV = (D + 15) / 16 * 16, NV = DV / 16, BH = B * H;
    bf16* kpack = (bf16*)aligned_alloc(64, BH * NK * DQ * sizeof(bf16));
    bf16* vpack = (bf16*)aligned_alloc(64, BH * NK * DV * sizeof(bf16));
    if (!kpack || !vpack) { free(kpack); free(vpack); return 1; }
    int failed = 0;
    // 1. Pack K as [block of 16 keys][channel chunk of 32][16 channel pairs][16 keys][2] (each right
    //    operand tile 1 KiB in a row) and V as [key pair][DV][2], per (b, h), zero-padded.
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bh = 0; bh < BH; bh++) {
        const int64_t b = bh / H, h = bh % H;
        bf16* kp = kpack + bh * NK * DQ;
        bf16* vp = vpack + bh * NK * DV;
        memset(kp, 0, NK * DQ * sizeof(bf16));
        memset(vp, 0, NK * DV * sizeof(bf16));
        for (int64_t j = 0; j < Lk; j++) {
            const bf16* kr = k + b * ks[0] + h * ks[1] + j * ks[2];
            const bf16* vr = v + b * vs[0] + h * vs[1] + j * vs[2];
            bf16* kb = kp + (j / 16) * 16 * DQ + (j % 16) * 2;
            for (int64_t d = 0; d < D; d++) kb[(d / KC) * 512 + ((d % KC) / 2) * 32 + (d % 2)] = kr[d];
            bf16* vb = vp + (j / 2) * DV * 2 + (j % 2);
            for (int64_t d = 0; d < D; d++) vb[d * 2] = vr[d];
        }
    }
    const int64_t nqb = (Lq + QB - 1) / QB;
    // 2. Per (b, h, block of QB query rows): scores, softmax in fp32, probabilities in bf16, P V.
    #pragma omp parallel num_threads(nthreads)
    {
        // torch's brgemm keeps the tile configuration it loaded on a thread between calls: put it back
        TileConfig saved;
        _tile_storeconfig(&saved);
        configure_tiles();
        bf16* qb = (bf16*)aligned_alloc(64, QB * DQ * sizeof(bf16));
        float* s = (float*)aligned_alloc(64, QB * NK * sizeof(float));
        bf16* pr = (bf16*)aligned_alloc(64, QB * NK * sizeof(bf16));
        float* o32 = (float*)aligned_alloc(64, QB * DV * sizeof(float));
        float* rinv = (float*)aligned_alloc(64, QB * sizeof(float));
        const bool have = qb && s && pr && o32 && rinv;
        if (!have) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < BH * nqb; item++) {
            if (!have) continue;
            const int64_t bh = item / nqb, i0 = (item % nqb) * QB, b = bh / H, h = bh % H;
            const int rows = (int)(Lq - i0 < QB ? Lq - i0 : QB);
            memset(qb, 0, QB * DQ * sizeof(bf16));
            for (int r = 0; r < rows; r++)
                memcpy(qb + r * DQ, q + b * qs[0] + h * qs[1] + (i0 + r) * qs[2], D * sizeof(bf16));
            const bf16* kp = kpack + bh * NK * DQ;
            // scores: 32 rows x 32 keys per call, over the channel chunks
            for (int64_t jb = 0; jb < NK / 16; jb += 2)
                tile_2x2(qb, DQ, KC, kp + jb * 16 * DQ, kp + (jb + 1) * 16 * DQ, 32, 512, NC, s + jb * 16, NK);
            if (rows < QB) memset(pr + rows * NK, 0, (QB - rows) * NK * sizeof(bf16));
            const __m512 c = _mm512_set1_ps(scale * 1.44269504088896341f);
            for (int r = 0; r < rows; r++) {
                const float* sr = s + r * NK;
                bf16* prr = pr + r * NK;
                __m512 mx = _mm512_set1_ps(-3.0e38f);
                int64_t j = 0;
                for (; j + 16 <= Lk; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + j));
                const __mmask16 tail = (__mmask16)((1u << (Lk - j)) - 1);
                if (Lk - j) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, sr + j));
                const __m512 neg_mc = _mm512_set1_ps(-(_mm512_reduce_max_ps(mx) * (scale * 1.44269504088896341f)));
                __m512 sum = _mm512_setzero_ps();
                for (j = 0; j + 16 <= Lk; j += 16) {
                    __m512 e = exp2_scaled(_mm512_loadu_ps(sr + j), c, neg_mc);
                    sum = _mm512_add_ps(sum, e);
                    _mm256_storeu_si256((__m256i*)(prr + j), (__m256i)_mm512_cvtneps_pbh(e));
                }
                if (Lk - j) {
                    __m512 e = _mm512_maskz_mov_ps(tail, exp2_scaled(_mm512_maskz_loadu_ps(tail, sr + j), c, neg_mc));
                    sum = _mm512_add_ps(sum, e);
                    _mm256_storeu_si256((__m256i*)(prr + j), (__m256i)_mm512_cvtneps_pbh(e));
                    j += 16;
                }
                for (; j < NK; j += 16) _mm256_storeu_si256((__m256i*)(prr + j), _mm256_setzero_si256());
                rinv[r] = 1.0f / lane_sum(sum);
            }
            // P V: 32 rows x 32 channels per call, over the key chunks of 32 (16 pairs of V rows)
            const bf16* vp = vpack + bh * NK * DV;
            int64_t n = 0;
            for (; n + 2 <= NV; n += 2)
                tile_2x2(pr, NK, KC, vp + n * 32, vp + (n + 1) * 32, DV * 2, 16 * DV * 2, NK / KC, o32 + n * 16, DV);
            if (n < NV) tile_2x1(pr, NK, KC, vp + n * 32, DV * 2, 16 * DV * 2, NK / KC, o32 + n * 16, DV);
            bf16* orow = out + b * os[0] + h * os[1] + i0 * os[2];
            for (int r = 0; r < rows; r++) {
                const __m512 inv = _mm512_set1_ps(rinv[r]);
                for (int64_t c = 0; c < NV; c++) {
                    __m256i hv = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o32 + r * DV + c * 16), inv));
                    const int64_t left = D - c * 16;
                    const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                    _mm256_mask_storeu_epi16((void*)(orow + r * os[2] + c * 16), mk, hv);
                }
            }
        }
        free(qb); free(s); free(pr); free(o32); free(rinv);
        if (saved.palette) _tile_loadconfig(&saved);
        else _tile_release();
    }
    free(kpack); free(vpack);
    return failed;
}
