"""Optional native kernels for the hottest loops of the ranked and random methods (TIES, Breadcrumbs, DARE, DELLA
and their mixes): pass 1's histogram of |delta|, the fused sparsify-and-blend of the task-vector family, the
Bernoulli masks from their random draws, DELLA's per-row ranks, the packed masks, RAM's / RAM+'s counts and
merge, Arcee Fusion's gate, SCE's variance and blend, DARE's masked magnitudes, and the blends of model_stock,
karcher, multislerp, slerp and nuslerp (`combination`). Each replaces a chain of
torch operations (one pass over memory each) with one pass, and gives the same bits as that chain: the same
float32 operations in the same order, compiled without FMA contraction, fast-math or -march (-mavx2 only where
the CPU has it: isa_flags; DELLA's rescale pass also has AVX-512 forms, chosen at run time where the CPU has
AVX-512 F, CD, DQ and VPOPCNTDQ: integer counts and the scalar float steps lane by lane) (tests/test_native.py
holds both paths to that, and the CLI's outputs to the same bytes).

The C source below is compiled once per source and compiler with the system C compiler (`$CC`, else `cc`),
cached atomically under `$COMPOSER_CACHE` (default `$XDG_CACHE_HOME/composer`, else `~/.cache/composer`) and
loaded with ctypes, which releases the GIL for each call. No compiler, a failed build, or `COMPOSER_NATIVE=0`:
composer runs the torch path, which is slower and computes the same bits. Nothing here is needed for
correctness."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

if TYPE_CHECKING:
    from torch import Tensor

MAX_INPUTS = 4  # task vectors one blend call takes; more: the torch path (whose sum over 5+ vectors is not
# a plain left-to-right sum, so the kernel would not give its bits)
LANES = 16  # the float64 lanes of the L1 sums of DARE's and DELLA's rescale (composer.methods.common.add_l1_lanes)

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

#define MAX_INPUTS 4
#define TILE 2048

static inline float as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t as_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float tabs(float x) { return as_float(as_bits(x) & 0x7fffffffu); } /* torch.abs: NaN too */

/* The same steps four at a time, in GCC/Clang vector extensions (portable to every target they support):
   compilers turn the scalar steps into branches, which do not vectorize. A comparison gives -1 (all bits) or 0
   per lane; masked with 1.0f's bits it is the step. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
static inline v4f vload(const float *p) { v4f v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, v4f v) { memcpy(p, &v, sizeof v); }
static inline v4f vsplat(float x) { v4f v = {x, x, x, x}; return v; }
typedef double v4d __attribute__((vector_size(32)));
static inline v4d widen(v4f v) { return __builtin_convertvector(v, v4d); }
static inline v4f vabs(v4f x) { v4i m = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff}; return (v4f)((v4i)x & m); }
static inline v4f v_at_zero(v4f diff) { return (v4f)(~(diff < vsplat(0.0f)) & (v4i)vsplat(1.0f)); }
static inline v4f v_above_zero(v4f diff) { return (v4f)((diff > vsplat(0.0f)) & (v4i)vsplat(1.0f)); }

/* Inputs come as float32 or as bfloat16 (kind 1: the mapped file's own elements, whose float32 values are their
   bits shifted up, exactly torch's conversion): elements [t0, t0 + len) of `p` as float32, its own memory or
   converted into `buf` (a tile: it stays in the L1 cache, where a float32 copy of the whole block would not) */
static inline const float *load(const void *p, int32_t kind, int64_t t0, int64_t len, float *buf) {
    if (!kind) return (const float *)p + t0;
    const uint16_t *h = (const uint16_t *)p + t0;
    for (int64_t j = 0; j < len; j++) { uint32_t u = (uint32_t)h[j] << 16; memcpy(buf + j, &u, sizeof u); }
    return buf;
}
/* A thread's buffers, their addresses found once per call: GCC recomputes a _Thread_local's address (a call to
   __tls_get_addr, in a shared library) at each use inside a loop, even through a local pointer, unless the
   pointer comes from a call it cannot see into (one such call per 8 elements was a quarter of the fused blend's
   time) */
#define THREAD_BUFFER(type, name, dims) \
    static _Thread_local type name##_tls dims; \
    static __attribute__((noinline)) void *name##_get(void) { return name##_tls; }
THREAD_BUFFER(float, tile_b, [TILE])
THREAD_BUFFER(float, tile_x, [TILE])
#define TILE_BUFFERS float *tile_b = (float *)tile_b_get(), *tile_x = (float *)tile_x_get()


/* pass 1 of composer.ranked.select: key 2 * (upper 16 bits of |d|) + (lower 16 bits not all 0). A tile's keys
   are computed first (a loop that vectorizes), then counted in uint32 bins (256 KB, half the caller's int64 ones:
   they stay in the L2 cache), added to the caller's at the end: 1.45 -> 0.6 ns per element on bf16 deltas here,
   where one loop incremented the int64 bins directly */
#define HIST_BINS (1 << 16)
#define HIST_SPAN ((int64_t)1 << 24) /* elements counted in uint32 bins before they are added up: none wraps */
static _Thread_local uint32_t hist32[HIST_BINS];
static _Thread_local uint16_t hist_keys[TILE];
/* the thread's bins and keys, found once per call (not inlined: GCC recomputes a _Thread_local's address, a call
   to __tls_get_addr in a shared library, at every use inside the loops, even from a local copy) */
typedef struct { uint32_t *bins; uint16_t *keys; } Hist;
static __attribute__((noinline)) Hist hist_begin(void) {
    Hist h = {hist32, hist_keys};
    memset(h.bins, 0, sizeof hist32);
    return h;
}
static inline uint16_t hist_key(uint32_t bits) {
    bits &= 0x7fffffffu;
    return (uint16_t)(((bits >> 16) << 1) | ((bits & 0xffffu) != 0u));
}
static inline void hist_count(Hist h, int64_t len) { for (int64_t j = 0; j < len; j++) h.bins[h.keys[j]] += 1; }
static void hist_flush(Hist h, int64_t *hist) {
    for (int32_t k = 0; k < HIST_BINS; k++) hist[k] += h.bins[k];
    memset(h.bins, 0, HIST_BINS * sizeof *h.bins);
}
void composer_hist16(const uint32_t *d, int64_t n, int64_t *hist) {
    Hist h = hist_begin();
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int64_t len = n - t0 < TILE ? n - t0 : TILE;
        for (int64_t j = 0; j < len; j++) h.keys[j] = hist_key(d[t0 + j]);
        hist_count(h, len);
        if ((t0 + len) % HIST_SPAN == 0) hist_flush(h, hist);
    }
    hist_flush(h, hist);
}

/* composer.methods.sparsify.bernoulli from its random draws, in place: 31 random bits per element (the low 31 of
   each int32), as float32 times 2**-31, kept (1) where below the probability (`p`, or `ps[j]` where given) */
static inline float below(uint32_t half, float p) { return (float)((float)(int32_t)(half & 0x7fffffffu) * 0x1p-31f < p); }
void composer_bernoulli(uint32_t *bits, int64_t n, float p, const float *ps) {
    float *out = (float *)bits;
    if (ps) for (int64_t j = 0; j < n; j++) out[j] = below(bits[j], ps[j]);
    else for (int64_t j = 0; j < n; j++) out[j] = below(bits[j], p);
}

/* composer.methods.common.pack_mask: element j of a 0/1 mask is bit j % 8 of byte j / 8 (padding bits 0) */
void composer_pack(const float *mask, int64_t n, uint8_t *out) {
    int64_t full = n / 8;
    for (int64_t k = 0; k < full; k++) {
        const float *m = mask + 8 * k;
        out[k] = (uint8_t)((m[0] != 0.0f) | (m[1] != 0.0f) << 1 | (m[2] != 0.0f) << 2 | (m[3] != 0.0f) << 3 |
                           (m[4] != 0.0f) << 4 | (m[5] != 0.0f) << 5 | (m[6] != 0.0f) << 6 | (m[7] != 0.0f) << 7);
    }
    if (n % 8) {
        uint8_t last = 0;
        for (int64_t j = 8 * full; j < n; j++) last |= (uint8_t)((mask[j] != 0.0f) << (j % 8));
        out[full] = last;
    }
}

/* composer.methods.common.unpack_mask: elements [start, start + n) of a packed mask as float32 0/1 */
void composer_unpack(const uint8_t *packed, int64_t start, int64_t n, float *out) {
    int64_t j = 0;
    for (; j < n && ((start + j) & 7); j++) {
        int64_t at = start + j;
        out[j] = (float)((packed[at >> 3] >> (at & 7)) & 1);
    }
    const v4i low = {1, 2, 4, 8}, high = {16, 32, 64, 128}, one = (v4i)vsplat(1.0f);
    for (; j + 8 <= n; j += 8) {  /* a byte at a time: its bits tested four lanes at a time */
        int32_t byte = packed[(start + j) >> 3];
        v4i bits = {byte, byte, byte, byte};
        vstore(out + j, (v4f)(((bits & low) != 0) & one));
        vstore(out + j + 4, (v4f)(((bits & high) != 0) & one));
    }
    for (; j < n; j++) {
        int64_t at = start + j;
        out[j] = (float)((packed[at >> 3] >> (at & 7)) & 1);
    }
}

/* composer.methods.sparsify.della_mask's keep probabilities: each element's rank (1..n) by |x| within its row, in
   a stable order (equal magnitudes in index order), then (density - epsilon) + (rank - 1) / (n - 1) * 2 * epsilon
   in float32, in torch's order of operations. A row of bfloat16 weights' task vector is ranked by counting
   (della_count_ranks); any other by an LSD radix sort of |x|'s 31 bits (which order as |x| does, NaN above inf),
   each entry the key above its index (< 2**32), in passes of 8 bits, each one stable (a stable sort's order is
   unique: any gives the same ranks); a pass whose digit all keys share (their OR and AND agree there) is skipped.
   Each pass splits the entries into SORT_STREAMS consecutive segments, each with its own counts and offsets, and
   steps through them side by side: equal digits follow one another in a row of similar magnitudes, and one
   counter's increments, each waiting on the last through memory, bound the sort. Segment s's entries of a digit
   go after those of segments < s: the pass stays stable.
   `scratch`: 2 * n uint64, n floats, then della_count_ranks' counts (2**15 uint32, 0), its `ord` (n uint32) and
   `first` (2**15 uint32). */
#define SORT_STREAMS 4
/* one stable pass of 8 bits at `shift` over n entries (of type T: uint64_t, or uint32_t) from cur to next */
#define RADIX_PASS(T, cur, next, n, shift) { \
    const int64_t seg_ = (n) / SORT_STREAMS, tail_ = seg_ * SORT_STREAMS; /* [tail_, n): the last segment's */ \
    uint32_t count[SORT_STREAMS][256]; \
    memset(count, 0, sizeof count); \
    for (int64_t j = 0; j < seg_; j++) \
        for (int s = 0; s < SORT_STREAMS; s++) count[s][(cur[s * seg_ + j] >> (shift)) & 255u]++; \
    for (int64_t j = tail_; j < (n); j++) count[SORT_STREAMS - 1][(cur[j] >> (shift)) & 255u]++; \
    uint32_t sum = 0; \
    for (int d = 0; d < 256; d++) \
        for (int s = 0; s < SORT_STREAMS; s++) { uint32_t t = count[s][d]; count[s][d] = sum; sum += t; } \
    for (int64_t j = 0; j < seg_; j++) \
        for (int s = 0; s < SORT_STREAMS; s++) { T e = cur[s * seg_ + j]; next[count[s][(e >> (shift)) & 255u]++] = e; } \
    for (int64_t j = tail_; j < (n); j++) { T e = cur[j]; next[count[SORT_STREAMS - 1][(e >> (shift)) & 255u]++] = e; } \
}

/* della_count_ranks' prefix step for bin `up` (counts exact + 2**16 * loose): its first rank into `first`, where
   its loose ones start into `count`; the running count after it */
static inline uint32_t della_bin(uint32_t *count, uint32_t *first, uint32_t up, uint32_t running) {
    uint32_t c = count[up];
    first[up] = running;
    count[up] = running + (c & 0xffffu);
    return running + (c & 0xffffu) + (c >> 16);
}

/* AVX-512 (F, CD, VPOPCNTDQ) forms of della_count_ranks' passes over a row, 16 elements at a time, where the
   CPU has it (checked at run time: the build itself takes no -m flag for it; composer_set_wide(0) turns them
   off). The counts are integers, so every lane's result is the scalar loop's: a lane's count before it is its
   bin's count before the vector (gathered) plus its earlier lanes' of the same bin (vpconflictd's mask, split
   into exact and loose lanes and counted), and the scatter leaves each bin the count of its last lane, which
   holds all of them. */
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 6) || (!defined(__clang__) && __GNUC__ >= 8))
#include <immintrin.h>
#define DELLA_WIDE 1
#define WIDE_TARGET __attribute__((target("avx512f,avx512cd,avx512vpopcntdq,avx512dq")))
static int wide_state = -1;  /* -1: not checked yet */
static int wide(void) {
    if (wide_state < 0) {
        __builtin_cpu_init();
        wide_state = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd")
                     && __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512dq");
    }
    return wide_state;
}
/* the count pass: `ord` each element's bin count before it, `count` the bins', `idx` the loose elements' indices
   (room for n + 16); returns the elements done (a multiple of 16), their loose ones' number in *m */
WIDE_TARGET static int64_t della_count_wide(const uint32_t *row, int64_t n, uint32_t *count, uint32_t *ord,
                                            uint32_t *idx, int64_t *m) {
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), low = _mm512_set1_epi32(0xffff);
    const __m512i one = _mm512_set1_epi32(1), loose_one = _mm512_set1_epi32(0x10000);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t j = 0, found = 0;
    for (; j + 16 <= n; j += 16) {
        __m512i k = _mm512_and_si512(_mm512_loadu_si512((const void *)(row + j)), magnitude);
        __m512i up = _mm512_srli_epi32(k, 16);
        __mmask16 is_loose = _mm512_test_epi32_mask(k, low);
        __m512i same = _mm512_conflict_epi32(up), loose_lanes = _mm512_set1_epi32((int)is_loose);
        __m512i before = _mm512_add_epi32(_mm512_popcnt_epi32(_mm512_andnot_si512(loose_lanes, same)),
                                          _mm512_slli_epi32(_mm512_popcnt_epi32(_mm512_and_si512(loose_lanes, same)), 16));
        __m512i c = _mm512_add_epi32(_mm512_i32gather_epi32(up, (const void *)count, 4), before);
        _mm512_storeu_si512((void *)(ord + j), c);
        _mm512_i32scatter_epi32((void *)count, up, _mm512_add_epi32(c, _mm512_mask_blend_epi32(is_loose, one, loose_one)), 4);
        _mm512_storeu_si512((void *)(idx + found),
                            _mm512_maskz_compress_epi32(is_loose, _mm512_add_epi32(lane, _mm512_set1_epi32((int)j))));
        found += __builtin_popcount((unsigned)is_loose);
    }
    *m = found;
    return j;
}
/* the prefix over the bins [lo, hi] (lo >= 1), 16 at a time: each bin's size (exact + loose), their running sum
   across the vector in four shifted adds, each bin's first rank and loose start as della_bin gives them (a bin
   with nothing in it gets them too, unread; its count is cleared with the others), stored for the bins in
   [lo, hi] only (the counts beside them may be other data) */
WIDE_TARGET static uint32_t della_bins_wide(uint32_t *count, uint32_t *first, uint32_t lo, uint32_t hi,
                                            uint32_t running) {
    const __m512i low = _mm512_set1_epi32(0xffff), zero = _mm512_setzero_si512();
    for (uint32_t g = lo & ~15u; g <= hi; g += 16) {
        uint32_t live = 0xffffu;
        if (g < lo) live &= ~((1u << (lo - g)) - 1u);
        if (hi - g < 15) live &= (1u << (hi - g + 1)) - 1u;
        __m512i c = _mm512_maskz_loadu_epi32((__mmask16)live, (const void *)(count + g));
        __m512i exact = _mm512_and_si512(c, low), size = _mm512_add_epi32(exact, _mm512_srli_epi32(c, 16));
        __m512i sum = size;
        sum = _mm512_add_epi32(sum, _mm512_alignr_epi32(sum, zero, 15));
        sum = _mm512_add_epi32(sum, _mm512_alignr_epi32(sum, zero, 14));
        sum = _mm512_add_epi32(sum, _mm512_alignr_epi32(sum, zero, 12));
        sum = _mm512_add_epi32(sum, _mm512_alignr_epi32(sum, zero, 8));
        __m512i start = _mm512_add_epi32(_mm512_set1_epi32((int)running), _mm512_sub_epi32(sum, size));
        _mm512_mask_storeu_epi32((void *)(first + g), (__mmask16)live, start);
        _mm512_mask_storeu_epi32((void *)(count + g), (__mmask16)live, _mm512_add_epi32(start, exact));
        running += (uint32_t)_mm_extract_epi32(_mm512_extracti32x4_epi32(sum, 3), 3);
    }
    return running;
}
/* the exact elements' probabilities, as della_count_ranks' scalar loop gives them, the table's entry computed as
   della_table computes it (the same float32 operations, in its order: (n + 1 - 1) / (n - 1), clamped, times 2,
   times epsilon, plus base); returns the elements done */
WIDE_TARGET static int64_t della_exact_wide(const uint32_t *row, int64_t n, const uint32_t *ord,
                                            const uint32_t *first, const float *formula, float *out) {
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), low = _mm512_set1_epi32(0xffff);
    const __m512i one = _mm512_set1_epi32(1);
    const __m512 base = _mm512_set1_ps(formula[0]), n_minus_1 = _mm512_set1_ps(formula[1]);
    const __m512 epsilon = _mm512_set1_ps(formula[2]), unit = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    const __m512 two = _mm512_set1_ps(2.0f);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512i k = _mm512_and_si512(_mm512_loadu_si512((const void *)(row + j)), magnitude);
        __mmask16 exact = _mm512_testn_epi32_mask(k, low);
        __m512i start = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), exact, _mm512_srli_epi32(k, 16),
                                                    (const void *)first, 4);
        __m512i pos = _mm512_maskz_add_epi32(exact, start,
                                             _mm512_and_si512(_mm512_loadu_si512((const void *)(ord + j)), low));
        __m512 rank = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(pos, one)), unit);
        __m512 norm = _mm512_max_ps(_mm512_min_ps(_mm512_div_ps(rank, n_minus_1), unit), zero);
        _mm512_storeu_ps(out + j, _mm512_add_ps(base, _mm512_mul_ps(_mm512_mul_ps(norm, two), epsilon)));
    }
    return j;
}
#endif
void composer_set_wide(int on) {
#ifdef DELLA_WIDE
    wide_state = on ? -1 : 0;
#else
    (void)on;
#endif
}
int composer_wide(void) {
#ifdef DELLA_WIDE
    return wide();
#else
    return 0;
#endif
}

/* A row's ranks by counting, where few keys' lower 16 bits are not 0 and n < 2**16: exact keys (lower bits 0)
   are counted per upper 15 bits (`count`, 2**15 uint32: exact + 2**16 * loose, 0 on entry and on return); each
   bin's first rank is the running sum over the upper values the row spans (`lo`, its least non-zero one, to `hi`;
   0, the zeros' value, first: `first`, 2**15 uint32), 8 empty ones skipped at a time; the exact elements take
   their ranks in index order; then each bin's loose ones (entries key << 32 | index, `loose`: 2 * n uint64) go
   after its exact ones, insertion-sorted there by (key, index) (a bin holds a few). Two passes over the row, one
   over its span of upper values and one over its few loose keys: 10.9 -> 8.5 cycles per element on a bf16 task
   vector's rows, against the bitmap of the upper values present and a radix sort of the loose keys it replaced.
   With the AVX-512 forms (wide()) the counting pass also keeps each element's count before it (`ord`, n uint32),
   so that the exact elements' ranks are first + that count, 16 at a time; without them the exact ranks come from
   `first` as it counts up (one pass less to store). 0: not applicable (nothing written). */
static int della_count_ranks(const uint32_t *row, int64_t n, int64_t loose_n, uint32_t lo, uint32_t hi,
                              const float *table, const float *formula, float *out, uint32_t *count,
                              uint32_t *ord, uint32_t *first, uint64_t *loose) {
    if (n >= 65536 || loose_n > n / 16) return 0;
    int64_t m = 0;
#ifdef DELLA_WIDE
    if (wide()) {  /* counts, each element's count before it, bins, exact ranks: 16 at a time */
        uint32_t *idx = (uint32_t *)(loose + n);  /* the insertion's room, free until then */
        int64_t j0 = della_count_wide(row, n, count, ord, idx, &m);
        for (int64_t i = 0; i < m; i++) loose[i] = (uint64_t)(row[idx[i]] & 0x7fffffffu) << 32 | idx[i];
        for (int64_t j = j0; j < n; j++) {
            uint32_t k = row[j] & 0x7fffffffu, up = k >> 16, is_loose = (k & 0xffffu) != 0, c = count[up];
            loose[m] = (uint64_t)k << 32 | (uint64_t)j;
            m += is_loose;
            ord[j] = c;
            count[up] = c + 1u + is_loose * 0xffffu;
        }
        uint32_t running = della_bin(count, first, 0, 0);
        running = della_bins_wide(count, first, lo == 0 ? 1 : lo, hi, running);
        j0 = n > 1 ? della_exact_wide(row, n, ord, first, formula, out) : 0;
        for (int64_t j = j0; j < n; j++) {
            uint32_t k = row[j] & 0x7fffffffu;
            if (!(k & 0xffffu)) out[j] = table[first[k >> 16] + (ord[j] & 0xffffu)];
        }
    } else
#endif
    {
        for (int64_t j = 0; j < n; j++) {
            uint32_t k = row[j] & 0x7fffffffu, up = k >> 16, is_loose = (k & 0xffffu) != 0;
            loose[m] = (uint64_t)k << 32 | (uint64_t)j;
            m += is_loose;
            count[up] += 1u + is_loose * 0xffffu;
        }
        /* each bin's start: exact elements first, then its loose ones */
        uint32_t running = 0;
        {
            uint32_t c = count[0];
            count[0] = running;
            running += (c & 0xffffu) + (c >> 16);
        }
        for (uint32_t g = lo == 0 ? 1 : lo; g <= hi; g += 8) {
            uint32_t stop = hi - g < 8 ? hi + 1 : g + 8;
            if (stop == g + 8) {
                uint64_t w[4];
                memcpy(w, count + g, sizeof w);
                if (!(w[0] | w[1] | w[2] | w[3])) continue;
            }
            for (uint32_t up = g; up < stop; up++) {
                uint32_t c = count[up];
                count[up] = running;
                running += (c & 0xffffu) + (c >> 16);
            }
        }
        for (int64_t j = 0; j < n; j++) {
            uint32_t k = row[j] & 0x7fffffffu;
            if (!(k & 0xffffu)) out[j] = table[count[k >> 16]++];
        }
    }
    /* count[up] is the bin's loose start (< 2**16); the loose ones go there in (key, index) order */
    uint64_t *buf = loose + n;
    for (int64_t i = 0; i < m; i++) {
        uint64_t e = loose[i];
        uint32_t up = (uint32_t)(e >> 48), c = count[up], start = c & 0xffffu, p = start + (c >> 16);
        count[up] = c + 0x10000u;
        while (p > start && buf[p - 1] > e) { buf[p] = buf[p - 1]; p--; }
        buf[p] = e;
    }
    for (int64_t i = 0; i < m; i++) {
        uint32_t up = (uint32_t)(loose[i] >> 48), c = count[up], p = (c & 0xffffu) + (c >> 16) - 1u;
        count[up] = c - 0x10000u;
        out[(uint32_t)buf[p]] = table[p];
    }
    count[0] = 0;
    if (lo == 0) lo = 1;
    if (lo <= hi) memset(count + lo, 0, (size_t)(hi + 1 - lo) * sizeof *count);
    return 1;
}

/* the probability at each position of a sorted row of n (every row's), into scratch's table */
static float *della_table(int64_t n, float base, float n_minus_1, float epsilon, uint64_t *scratch) {
    float *table = (float *)(scratch + 2 * n);
    for (int64_t position = 0; position < n; position++) {
        float rank_norm = n > 1 ? ((float)(position + 1) - 1.0f) / n_minus_1 : 0.0f;
        rank_norm = rank_norm < 0.0f ? 0.0f : rank_norm > 1.0f ? 1.0f : rank_norm;
        table[position] = base + rank_norm * 2.0f * epsilon;
    }
    return table;
}
/* one row's probabilities (see composer_della_probs) */
static void della_row(const uint32_t *row, int64_t n, const float *table, const float *formula, float *out,
                      uint64_t *scratch) {
    uint32_t *count = (uint32_t *)(scratch + 2 * n + (n + 1) / 2);
    uint32_t any = 0, all = 0x7fffffffu, lo = 0x7fffu, hi = 0;
    int64_t loose = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t k = row[j] & 0x7fffffffu, up = k >> 16, nz = k ? up : 0x7fffu;
        any |= k; all &= k; loose += (k & 0xffffu) != 0;
        lo = nz < lo ? nz : lo; hi = up > hi ? up : hi;
    }
    uint32_t *ord = count + (1 << 15), *first = ord + n;
    if (della_count_ranks(row, n, loose, lo, hi, table, formula, out, count, ord, first, scratch)) return;
    uint64_t *cur = scratch, *next = scratch + n;
    for (int64_t j = 0; j < n; j++) cur[j] = (uint64_t)(row[j] & 0x7fffffffu) << 32 | (uint64_t)j;
    for (int shift = 0; shift < 32; shift += 8) {
        if ((((any ^ all) >> shift) & 255u) == 0) continue;
        RADIX_PASS(uint64_t, cur, next, n, 32 + shift)
        uint64_t *t = cur; cur = next; next = t;
    }
    for (int64_t position = 0; position < n; position++) out[(uint32_t)cur[position]] = table[position];
}
void composer_della_probs(const uint32_t *rows, int64_t n_rows, int64_t n, float base, float n_minus_1,
                          float epsilon, uint64_t *scratch, float *probs) {
    const float *table = della_table(n, base, n_minus_1, epsilon, scratch), formula[3] = {base, n_minus_1, epsilon};
    for (int64_t r = 0; r < n_rows; r++) della_row(rows + r * n, n, table, formula, probs + r * n, scratch);
}

/* The torch chains below, as comparisons (no branches, so the loops vectorize), with the same results: */
/* composer.ranked._step(diff, True), sign(diff) + 1 clamped to <= 1: 0 where diff < 0, else 1 (NaN: sign 0, 1) */
static inline float at_zero(float diff) { return (float)!(diff < 0.0f); }
/* _step(diff, False), sign(diff) clamped to >= 0: 1 where diff > 0, else +0 */
static inline float above_zero(float diff) { return (float)(diff > 0.0f); }


/* the mask of one task vector over a tile, applied: LOW and HIGH its steps (HIGH 1: no upper end; times 1 is
   exact, as torch's skipped multiplication), vectors then the scalar tail */
#define MASK_LOOP(LOW, HIGH) { \
    int64_t j = 0; \
    const v4f vli = vsplat(li), vhi = vsplat(hi_); (void)vhi; \
    for (; j + 4 <= len; j += 4) { \
        v4f v = vload(di + j), a = vabs(v); v4f k = v_##LOW(a - vli); k = k * V_##HIGH; vstore(di + j, v * k); \
    } \
    for (; j < len; j++) { float v = di[j], a = tabs(v); float k = LOW(a - li); k = k * S_##HIGH; di[j] = v * k; } \
}
#define V_one vsplat(1.0f)
#define S_one 1.0f
#define V_hi_at_zero v_at_zero(vhi - a)
#define S_hi_at_zero at_zero(hi_ - a)
#define V_hi_above_zero v_above_zero(vhi - a)
#define S_hi_above_zero above_zero(hi_ - a)

/* The sum over the task vectors, written out for 2 and for 4 of them (no inner loops: the loop over the elements
   vectorizes). Fewer vectors are padded with zero ones of weight 0, which change no bit: every running sum
   starts at +0, so it is never -0, and adding +-0 to it is exact. `elect`: TIES' sign election and the disjoint
   mean; `plain`: the (weighted) sum. */
/* _sign_consensus: (sign(d) * majority) clamped to >= 0, where majority = sign(sign(sum) + 0.5) is +1 unless
   sum < 0. That is 1 where d has the majority's sign, else +0 or -0 (-0 only where d is +-0 or NaN and the
   majority -1); +0 for -0 changes no bit of the sums it is multiplied into, which start at +0 and so are never -0
   (the weights are >= 0: TIES refuses negative ones) */
static inline float keep_sign(float d, int positive) {
    return (float)((positive & (d > 0.0f)) | (!positive & (d < 0.0f)));
}

#define ELECT_BODY(TERMS_SUM, TERMS_K, TERMS_MIX, TERMS_DIV) \
    if (normalize) ELECT_LOOP(TERMS_SUM, TERMS_K, TERMS_MIX, TERMS_DIV, div) \
    else ELECT_LOOP(TERMS_SUM, TERMS_K, TERMS_MIX, TERMS_DIV, 1.0f)

/* one loop per divisor (a select inside would stop the vectorizer); dividing by 1 is exact */
#define ELECT_LOOP(TERMS_SUM, TERMS_K, TERMS_MIX, TERMS_DIV, DIVISOR) \
    for (int64_t j = 0; j < len; j++) { \
        float sum = 0.0f; TERMS_SUM \
        int majority = !(sum < 0.0f); /* 1: +1 */ \
        TERMS_K \
        float mixed = 0.0f, div = 0.0f; TERMS_MIX TERMS_DIV \
        div = div + (float)(div == 0.0f); /* + 1 - sign(|div|): div is >= +0, never NaN */ \
        mixed = mixed / DIVISOR; \
        mixed = mixed * lambda_; /* 1 where torch skips it: exact too */ \
        o[j] = b[j] + mixed; \
    }

static __attribute__((noinline)) void elect2(const float *restrict d0, const float *restrict d1, const float *w,
        const float *restrict b, float *restrict o, int64_t len, int32_t normalize, float lambda_) {
    const float w0 = w[0], w1 = w[1];
    ELECT_BODY(sum = sum + d0[j]; sum = sum + d1[j];,
               float k0 = keep_sign(d0[j], majority); float k1 = keep_sign(d1[j], majority);,
               mixed = mixed + d0[j] * k0; mixed = mixed + d1[j] * k1;,
               div = div + w0 * k0; div = div + w1 * k1;)
}

static __attribute__((noinline)) void elect4(const float *restrict d0, const float *restrict d1,
        const float *restrict d2, const float *restrict d3, const float *w, const float *restrict b,
        float *restrict o, int64_t len, int32_t normalize, float lambda_) {
    const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
    ELECT_BODY(sum = sum + d0[j]; sum = sum + d1[j]; sum = sum + d2[j]; sum = sum + d3[j];,
               float k0 = keep_sign(d0[j], majority); float k1 = keep_sign(d1[j], majority);
               float k2 = keep_sign(d2[j], majority); float k3 = keep_sign(d3[j], majority);,
               mixed = mixed + d0[j] * k0; mixed = mixed + d1[j] * k1; mixed = mixed + d2[j] * k2;
               mixed = mixed + d3[j] * k3;,
               div = div + w0 * k0; div = div + w1 * k1; div = div + w2 * k2; div = div + w3 * k3;)
}

static __attribute__((noinline)) void plain2(const float *restrict d0, const float *restrict d1,
        const float *restrict b, float *restrict o, int64_t len, float divisor, float lambda_) {
    for (int64_t j = 0; j < len; j++) {
        float mixed = 0.0f; mixed = mixed + d0[j]; mixed = mixed + d1[j];
        o[j] = b[j] + (mixed / divisor) * lambda_; /* divisor 1 when not normalizing */
    }
}

static __attribute__((noinline)) void plain4(const float *restrict d0, const float *restrict d1,
        const float *restrict d2, const float *restrict d3, const float *restrict b, float *restrict o,
        int64_t len, float divisor, float lambda_) {
    for (int64_t j = 0; j < len; j++) {
        float mixed = 0.0f; mixed = mixed + d0[j]; mixed = mixed + d1[j]; mixed = mixed + d2[j];
        mixed = mixed + d3[j];
        o[j] = b[j] + (mixed / divisor) * lambda_;
    }
}

/* composer.methods.taskvectors._task_arithmetic with composer.ranked.apply as its sparsifier.
   mode[i]: 0 keep everything, 1 keep nothing, 2 keep by the steps (lo[i], lowz[i]) and, unless unbounded[i],
   (hi[i], highz[i]), 3 multiply by masks[i] (float32), 4 by packed masks[i]'s elements from bit mask_start[i];
   factor[i] applied where has_factor[i] (modes 1 to 4).
   consensus: TIES' sign election;
   else `divisor` is the sum of the weights (1 where it is ~0). */
THREAD_BUFFER(float, ties_scratch, [MAX_INPUTS + 1][TILE])
void composer_ties_blend(const void *base, const void *const *xs, const int32_t *kinds, const void *const *masks,
                         const int64_t *mask_start, int32_t n, const int32_t *mode,
                         const float *lo, const int32_t *lowz, const float *hi, const int32_t *highz,
                         const int32_t *unbounded, const float *factor, const int32_t *has_factor,
                         const float *w, int32_t consensus, int32_t normalize, float divisor,
                         float lambda_, float *out, int64_t count) {
    float (*scratch)[TILE] = (float (*)[TILE])ties_scratch_get();
    float (*d)[TILE] = scratch, *unpacked = scratch[MAX_INPUTS];
    TILE_BUFFERS;
    float wp[MAX_INPUTS] = {0.0f, 0.0f, 0.0f, 0.0f};
    int32_t padded = n <= 2 ? 2 : 4;
    for (int32_t i = 0; i < n; i++) wp[i] = w[i];
    for (int32_t i = n; i < padded; i++) memset(d[i], 0, sizeof d[i]);  /* +0, weight 0: see elect2 */
    for (int64_t t0 = 0; t0 < count; t0 += TILE) {
        int64_t len = count - t0 < TILE ? count - t0 : TILE;
        const float *b = load(base, kinds[0], t0, len, tile_b);
        for (int32_t i = 0; i < n; i++) {  /* each task vector over the tile: loops the compiler vectorizes */
            float *di = d[i];
            const float wi = w[i], li = lo[i], hi_ = hi[i], fi = factor[i];
            const int32_t lz = lowz[i], hz = highz[i], unb = unbounded[i], m = mode[i];
            const int32_t f = m != 0 && has_factor[i];
            if (kinds[1 + i] == 1) {  /* bfloat16: converted as it is subtracted */
                const uint16_t *h = (const uint16_t *)xs[i] + t0;
                for (int64_t j = 0; j < len; j++) di[j] = as_float((uint32_t)h[j] << 16) - b[j];
            } else {
                const float *x = load(xs[i], kinds[1 + i], t0, len, tile_x);
                for (int64_t j = 0; j < len; j++) di[j] = x[j] - b[j];
            }
            if (m == 3 || m == 4) {  /* a mask drawn beforehand (DARE, DELLA), or the same packed
                                        (composer.methods.common.pack_mask) from bit mask_start[i]: the mask, the
                                        factor and the weight in one pass, each product rounded as the steps are */
                const float *mi = (const float *)masks[i] + t0;
                if (m == 4) {
                    composer_unpack((const uint8_t *)masks[i], mask_start[i] + t0, len, unpacked);
                    mi = unpacked;
                }
                if (f) for (int64_t j = 0; j < len; j++) di[j] = ((di[j] * mi[j]) * fi) * wi;
                else for (int64_t j = 0; j < len; j++) di[j] = (di[j] * mi[j]) * wi;
                continue;
            }
            if (m == 1) {
                for (int64_t j = 0; j < len; j++) di[j] = di[j] * 0.0f;
            } else if (m == 2) {  /* one loop per kind of step (a branch inside would stop the vectorizer) */
                if (unb) {
                    if (lz) MASK_LOOP(at_zero, one) else MASK_LOOP(above_zero, one)
                } else if (lz) {
                    if (hz) MASK_LOOP(at_zero, hi_at_zero) else MASK_LOOP(at_zero, hi_above_zero)
                } else {
                    if (hz) MASK_LOOP(above_zero, hi_at_zero) else MASK_LOOP(above_zero, hi_above_zero)
                }
            }
            if (f) for (int64_t j = 0; j < len; j++) di[j] = di[j] * fi;
            for (int64_t j = 0; j < len; j++) di[j] = di[j] * wi;
        }
        float *o = out + t0;
        float dn = normalize ? divisor : 1.0f;
        if (n <= 2) {
            if (consensus) elect2(d[0], d[1], wp, b, o, len, normalize, lambda_);
            else plain2(d[0], d[1], b, o, len, dn, lambda_);
        } else {
            if (consensus) elect4(d[0], d[1], d[2], d[3], wp, b, o, len, normalize, lambda_);
            else plain4(d[0], d[1], d[2], d[3], b, o, len, dn, lambda_);
        }
    }
}
/* composer.methods.fusion's RAM and RAM+ over tiles (their torch chains, the same float32 operations in order):
   d_i = x_i - b; nz_i = sign(|d_i| - eps) clamped to >= 0, i.e. 1 where |d_i| - eps > 0, else +0 (NaN too: torch's
   sign gives 0 for NaN); c = 0 + nz_0 + nz_1 + ... (small integers: exact in any order).
   counts (when given): counts[2i] += #(nz_i = 1), counts[2i + 1] += #(nz_i = 1 and c = 1).
   out (when given): b + sum over i, from +0 in model order, of ((d_i * nz_i) / max(c, 1)) * scale_i, where
   scale_i = (1 - |sign(c - 1)|) * lambda[i] + clamp(sign(c - 1), min=0) with lambda (RAM+), and no scale (RAM). */
THREAD_BUFFER(float, ram_scratch, [2 * MAX_INPUTS + 4][TILE])
void composer_ram(const void *base, const void *const *xs, const int32_t *kinds, int32_t n, float eps,
                  const float *lambda, int64_t *counts, float *out, int64_t count) {
    TILE_BUFFERS;
    float (*scratch)[TILE] = (float (*)[TILE])ram_scratch_get();
    float (*d)[TILE] = scratch, (*nz)[TILE] = scratch + MAX_INPUTS;
    float *c = scratch[2 * MAX_INPUTS], *cl = scratch[2 * MAX_INPUTS + 1], *u = scratch[2 * MAX_INPUTS + 2],
          *ov = scratch[2 * MAX_INPUTS + 3];
    for (int64_t t0 = 0; t0 < count; t0 += TILE) {
        int64_t len = count - t0 < TILE ? count - t0 : TILE;
        const float *b = load(base, kinds[0], t0, len, tile_b);
        for (int64_t j = 0; j < len; j++) c[j] = 0.0f;
        for (int32_t i = 0; i < n; i++) {
            const float *x = load(xs[i], kinds[1 + i], t0, len, tile_x);
            float *di = d[i], *zi = nz[i];
            for (int64_t j = 0; j < len; j++) {
                float v = x[j] - b[j];
                di[j] = v;
                zi[j] = (float)(tabs(v) - eps > 0.0f);
                c[j] = c[j] + zi[j];
            }
        }
        if (counts) {
            for (int32_t i = 0; i < n; i++) {
                const float *zi = nz[i];
                int64_t changed = 0, alone = 0;
                for (int64_t j = 0; j < len; j++) {
                    changed += zi[j] == 1.0f;
                    alone += (zi[j] == 1.0f) & (c[j] == 1.0f);
                }
                counts[2 * i] += changed;
                counts[2 * i + 1] += alone;
            }
        }
        if (!out) continue;
        float *o = out + t0;
        for (int64_t j = 0; j < len; j++) {
            float c1 = c[j] - 1.0f, step = (float)(c1 > 0.0f) - (float)(c1 < 0.0f);
            cl[j] = c[j] < 1.0f ? 1.0f : c[j];
            u[j] = 1.0f - tabs(step);
            ov[j] = (float)(step > 0.0f);
            o[j] = 0.0f;
        }
        for (int32_t i = 0; i < n; i++) {
            const float *di = d[i], *zi = nz[i];
            if (lambda) {
                const float li = lambda[i];
                for (int64_t j = 0; j < len; j++) o[j] = o[j] + ((di[j] * zi[j]) / cl[j]) * (u[j] * li + ov[j]);
            } else {
                for (int64_t j = 0; j < len; j++) o[j] = o[j] + (di[j] * zi[j]) / cl[j];
            }
        }
        for (int64_t j = 0; j < len; j++) o[j] = b[j] + o[j];
    }
}

/* composer.methods.fusion._fusion_blend: element j (at `offset` + j of rows of `width`, row r's KL kl[r]) is
   b + (x - b) * [|x - b| * kl >= threshold], the mask 1.0 or +0 (NaN: 0) */
static inline v4f v_ge(v4f a, v4f b) { return (v4f)((a >= b) & (v4i)vsplat(1.0f)); }

void composer_fusion_blend(const void *base, const void *x, const int32_t *kinds, const float *kl, int64_t offset,
                           int64_t width, float threshold, float *out, int64_t count) {
    TILE_BUFFERS;
    float *tb = tile_b, *tx = tile_x;
    int64_t j = 0, row = 0, col = offset;
    const v4f vt = vsplat(threshold);
    while (j < count) {
        int64_t len = width - col < count - j ? width - col : count - j;
        const float k = kl[row];
        const v4f vk = vsplat(k);
        for (int64_t t = 0; t < len; t += TILE) {  /* the row's part in tiles, converted as they load */
            int64_t l = len - t < TILE ? len - t : TILE, i = 0;
            const float *b = load(base, kinds[0], j + t, l, tb), *xj = load(x, kinds[1], j + t, l, tx);
            float *o = out + j + t;
            for (; i + 4 <= l; i += 4) {
                v4f bv = vload(b + i), d = vload(xj + i) - bv;
                vstore(o + i, bv + d * v_ge(vabs(d) * vk, vt));
            }
            for (; i < l; i++) {
                float d = xj[i] - b[i];
                o[i] = b[i] + d * (float)(tabs(d) * k >= threshold);
            }
        }
        j += len; row++; col = 0;
    }
}
/* composer.methods.fusion.order_statistics: the values at positions `ranks` (r of them) of n float32 values
   without NaN in torch.sort's order (-0.0 before +0.0): the bits made into int32 keys that order as the floats
   do, a histogram of their upper 16 bits, then each rank's bin gathered into `scratch` (n + r int32) and the
   rank found there by quickselect. 0: done; 1: more than ORDER_RANKS ranks, or no memory (use torch) */
static int32_t kth_key(int32_t *a, int64_t m, int64_t k) {
    int64_t lo = 0, hi = m - 1;
    while (lo < hi) {
        int32_t p0 = a[lo], p1 = a[lo + (hi - lo) / 2], p2 = a[hi];
        int32_t pivot = p0 < p1 ? (p1 < p2 ? p1 : (p0 < p2 ? p2 : p0)) : (p0 < p2 ? p0 : (p1 < p2 ? p2 : p1));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) { int32_t t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return a[k];
    }
    return a[k];
}
static inline int32_t order_key(float v) { int32_t b = (int32_t)as_bits(v); return b ^ ((b >> 31) & 0x7fffffff); }
#define ORDER_RANKS 8
int32_t composer_order_statistics(const float *x, int64_t n, const int64_t *ranks, int32_t r, float *out,
                                  int32_t *scratch) {
    if (r > ORDER_RANKS) return 1;
    int64_t *cum = (int64_t *)calloc(1 << 16, sizeof *cum);
    if (!cum) return 1;
    for (int64_t j = 0; j < n; j++) cum[(order_key(x[j]) >> 16) + 32768] += 1;
    for (int32_t k = 1; k < (1 << 16); k++) cum[k] += cum[k - 1];
    int64_t bins[ORDER_RANKS], below[ORDER_RANKS], fill[ORDER_RANKS], start[ORDER_RANKS];
    for (int32_t q = 0; q < r; q++) {
        int64_t rank = ranks[q], bin = 0, step = 1 << 15;
        while (step) { if (cum[bin + step - 1] <= rank) bin += step; step >>= 1; }  /* the first with cum > rank */
        if (cum[bin] <= rank) bin++;
        bins[q] = bin;
        below[q] = bin ? cum[bin - 1] : 0;
    }
    /* every rank's bin gathered in one pass, each into its own region of `scratch` (n + r int32: a region's spare
       last slot takes the writes of the elements that do not match, so the loop has no branch) */
    int64_t at = 0;
    int32_t distinct[ORDER_RANKS], nd = 0;  /* the ranks that gather a bin (ranks in one bin share its region) */
    for (int32_t q = 0; q < r; q++) {
        int32_t e = 0;
        while (e < nd && bins[distinct[e]] != bins[q]) e++;
        if (e < nd) { start[q] = start[distinct[e]]; continue; }
        start[q] = fill[q] = at;
        at += cum[bins[q]] - below[q] + 1;
        distinct[nd++] = q;
    }
    for (int64_t j = 0; j < n; j++) {
        int32_t key = order_key(x[j]);
        int64_t bin = (key >> 16) + 32768;
        for (int32_t e = 0; e < nd; e++) {
            int32_t q = distinct[e];
            scratch[fill[q]] = key;
            fill[q] += bin == bins[q];
        }
    }
    for (int32_t q = 0; q < r; q++) {
        int32_t key = kth_key(scratch + start[q], cum[bins[q]] - below[q], ranks[q] - below[q]);
        out[q] = as_float((uint32_t)(key ^ ((key >> 31) & 0x7fffffff)));
    }
    free(cum);
    return 0;
}
/* arcee_fusion's quantile sample: the m drawn positions (int64, each in [0, numel), numel <= 2^31) in ascending
   order, as int32, into `out`, by least-significant-digit radix passes of 8 bits (as many as numel needs; `tmp`:
   m int32 scratch). 256 buckets: their write positions stay in the L1 cache, where 2048 (11-bit digits, fewer
   passes) were slower here. torch.sort of the same numbers gives the same sequence (equal keys are equal) */
void composer_sort_positions(const int64_t *pos, int64_t m, int64_t numel, int32_t *out, int32_t *tmp) {
    int32_t bits = 1;
    while (bits < 31 && ((int64_t)1 << bits) < numel) bits++;
    int32_t passes = (bits + 7) / 8;
    int64_t st[256];
    const int32_t *src = 0;
    for (int32_t pass = 0; pass < passes; pass++) {
        int32_t *dst = (passes - pass) % 2 ? out : tmp, shift = 8 * pass;
        memset(st, 0, sizeof st);
        if (!pass) for (int64_t k = 0; k < m; k++) st[pos[k] & 255] += 1;
        else for (int64_t k = 0; k < m; k++) st[(src[k] >> shift) & 255] += 1;
        int64_t at = 0;
        for (int32_t d = 0; d < 256; d++) { int64_t c = st[d]; st[d] = at; at += c; }
        if (!pass) for (int64_t k = 0; k < m; k++) dst[st[pos[k] & 255]++] = (int32_t)pos[k];
        else for (int64_t k = 0; k < m; k++) dst[st[(src[k] >> shift) & 255]++] = src[k];
        src = dst;
    }
}
/* ... and the importances at m of them (ascending, each in [a, a + the piece's length)) in a piece of whole
   float32 rows (of `width`; their KLs `kl`) that starts at element a: |x - b| times the row's KL, torch's
   (x - b).abs() * kl at those positions */
void composer_fusion_picked(const float *base, const float *x, const float *kl, int64_t width, const int32_t *pos,
                            int64_t m, int64_t a, float *out) {
    int64_t row = 0, end = width;
    for (int64_t k = 0; k < m; k++) {
        int64_t j = pos[k] - a;
        while (j >= end) { row++; end += width; }
        out[k] = tabs(x[j] - base[j]) * kl[row];
    }
}
/* composer.methods.fusion._sce_variance of the deltas x_i - b (float32 subtractions), Welford's float64 updates
   in torch's order (the first one skipped, as there), m2 / n rounded to float32; n == 1: x0 * (x0 - x0). One tile
   (elements [t0, t0 + len), len <= TILE) into o; mean, m2: TILE doubles each; tb, tx: the tile buffers */
/* n of 2 to 4 (a constant where it is inlined): the same float64 operations in the same order, each element's
   Welford updates in registers in one loop, where the general form keeps mean and m2 in arrays between loops */
static inline __attribute__((always_inline)) void sce_var_run(const int32_t n, const float *b, const float *const *x,
                                                              int64_t len, float *o) {
    for (int64_t j = 0; j < len; j++) {
        double mean = (double)(x[0][j] - b[j]), m2 = 0.0;
        for (int32_t k = 1; k < n; k++) {
            double v = (double)(x[k][j] - b[j]), delta = v - mean;
            /* divisions by 2 and 4 are multiplications by 0.5 and 0.25 (the same correctly rounded number) */
            mean = k == 1 ? mean + delta * 0.5 : k == 3 ? mean + delta * 0.25 : mean + delta / (double)(k + 1);
            m2 = k == 1 ? delta * (v - mean) : m2 + delta * (v - mean);
        }
        o[j] = n == 2 ? (float)(m2 * 0.5) : n == 4 ? (float)(m2 * 0.25) : (float)(m2 / (double)n);
    }
}
static void sce_var_tile(const void *base, const void *const *xs, const int32_t *kinds, int32_t n, int64_t t0,
                         int64_t len, float *o, double *mean, double *m2, float *tb, float *tx) {
    const float *b = load(base, kinds[0], t0, len, tb), *x0 = load(xs[0], kinds[1], t0, len, tx);
    if (n >= 2 && n <= MAX_INPUTS) {  /* every input in a tile of its own: mean's and m2's memory hold four */
        const float *x[MAX_INPUTS] = {x0};
        float *spare[3] = {(float *)mean, (float *)mean + TILE, (float *)m2};
        for (int32_t k = 1; k < n; k++) x[k] = load(xs[k], kinds[1 + k], t0, len, spare[k - 1]);
        switch (n) {
            case 2: sce_var_run(2, b, x, len, o); break;
            case 3: sce_var_run(3, b, x, len, o); break;
            default: sce_var_run(4, b, x, len, o); break;
        }
        return;
    }
    if (n == 1) {
        for (int64_t j = 0; j < len; j++) { double x = (double)(x0[j] - b[j]); o[j] = (float)(x * (x - x)); }
        return;
    }
    for (int64_t j = 0; j < len; j++) mean[j] = (double)(x0[j] - b[j]);
    /* x / 2**p and x * 2**-p are the same correctly rounded number: divisions by 2 and 4 are multiplications
       (one loop per case: a select inside stops the vectorizer) */
    for (int32_t k = 1; k < n; k++) {
        const float *xk = load(xs[k], kinds[1 + k], t0, len, tx);
        const double count_k = (double)(k + 1), inverse = 1.0 / count_k;
        if (k == 1) {  /* m2 starts as the first term */
            for (int64_t j = 0; j < len; j++) {
                double x = (double)(xk[j] - b[j]), delta = x - mean[j];
                mean[j] = mean[j] + delta * inverse;
                m2[j] = delta * (x - mean[j]);
            }
        } else if (k == 3) {
            for (int64_t j = 0; j < len; j++) {
                double x = (double)(xk[j] - b[j]), delta = x - mean[j];
                mean[j] = mean[j] + delta * inverse;
                m2[j] = m2[j] + delta * (x - mean[j]);
            }
        } else {
            for (int64_t j = 0; j < len; j++) {
                double x = (double)(xk[j] - b[j]), delta = x - mean[j];
                mean[j] = mean[j] + delta / count_k;
                m2[j] = m2[j] + delta * (x - mean[j]);
            }
        }
    }
    const double dn = (double)n, inverse_n = 1.0 / dn;
    if (n == 2 || n == 4) for (int64_t j = 0; j < len; j++) o[j] = (float)(m2[j] * inverse_n);
    else for (int64_t j = 0; j < len; j++) o[j] = (float)(m2[j] / dn);
}
/* the thread's buffers for SCE's passes, found once per call (see hist_begin) */
typedef struct { double mean[TILE], m2[TILE]; float var[TILE], mask[TILE], b[TILE], x[TILE]; } SceScratch;
static _Thread_local SceScratch sce_scratch_tls;
static __attribute__((noinline)) SceScratch *sce_scratch(void) { return &sce_scratch_tls; }
void composer_sce_var(const void *base, const void *const *xs, const int32_t *kinds, int32_t n, float *out,
                      int64_t count) {
    SceScratch *w = sce_scratch();
    for (int64_t t0 = 0; t0 < count; t0 += TILE) {
        int64_t len = count - t0 < TILE ? count - t0 : TILE;
        sce_var_tile(base, xs, kinds, n, t0, len, out + t0, w->mean, w->m2, w->b, w->x);
    }
}
/* SCE's pass 1 in one: composer_hist16 of the variance (composer_sce_var's), without storing it */
void composer_sce_var_hist(const void *base, const void *const *xs, const int32_t *kinds, int32_t n, int64_t count,
                           int64_t *hist) {
    SceScratch *w = sce_scratch();
    Hist h = hist_begin();
    for (int64_t t0 = 0; t0 < count; t0 += TILE) {
        int64_t len = count - t0 < TILE ? count - t0 : TILE;
        sce_var_tile(base, xs, kinds, n, t0, len, w->var, w->mean, w->m2, w->b, w->x);
        for (int64_t j = 0; j < len; j++) h.keys[j] = hist_key(as_bits(w->var[j]));
        hist_count(h, len);
        if ((t0 + len) % HIST_SPAN == 0) hist_flush(h, hist);
    }
    hist_flush(h, hist);
}
/* composer_nth_equal_delta of SCE's variance (composer_sce_var's): the index of the rank-th element whose |var|
   has these float32 bits, -1 - their count when fewer */
int64_t composer_sce_nth_equal(const void *base, const void *const *xs, const int32_t *kinds, int32_t n,
                               int64_t count, uint32_t bits, int64_t rank) {
    SceScratch *w = sce_scratch();
    int64_t seen = 0;
    for (int64_t t0 = 0; t0 < count; t0 += TILE) {
        int64_t len = count - t0 < TILE ? count - t0 : TILE, here = 0;
        sce_var_tile(base, xs, kinds, n, t0, len, w->var, w->mean, w->m2, w->b, w->x);
        for (int64_t j = 0; j < len; j++) here += (as_bits(w->var[j]) & 0x7fffffffu) == bits;
        if (rank < seen + here)
            for (int64_t j = 0; j < len; j++)
                if ((as_bits(w->var[j]) & 0x7fffffffu) == bits && seen++ == rank) return t0 + j;
        seen += here;
    }
    return -1 - seen;
}
/* SCE's mean-squares pass in one: the variance, its mask (composer.ranked.Keep.mask's one step per end, from
   `steps` {mode, lo, lo_at_zero, hi, hi_at_zero}: mode 0 no mask, 1 |var| against lo only, 2 lo and hi, 3 nothing
   kept, 4 the mask given) into `mask` (float32 0/1, as Keep.mask; not written in modes 0 and 4), and the float32
   squares ((x_i - b) *
   mask)^2 (torch's deltas * mask, then square()) added to float64 lanes [n, 8] (element k into lane k % 8, each
   lane in index order): composer.methods.fusion.add_square_lanes' order */
void composer_sce_masked_squares(const void *base, const void *const *xs, const int32_t *kinds, int32_t n,
                                 int32_t mode, float lo, int32_t lo_at_zero, float hi, int32_t hi_at_zero,
                                 float *mask, double *lanes, int64_t count) {
    SceScratch *w = sce_scratch();
    v4d acc[2 * MAX_INPUTS];
    memcpy(acc, lanes, (size_t)n * 8 * sizeof(double));
    const v4f vlo = vsplat(lo), vhi = vsplat(hi);
    for (int64_t t0 = 0; t0 < count; t0 += TILE) {  /* tiles start at multiples of 8 */
        int64_t len = count - t0 < TILE ? count - t0 : TILE, j;
        float *m = mode ? mask + t0 : 0;
        if (mode == 1 || mode == 2) {
            sce_var_tile(base, xs, kinds, n, t0, len, w->var, w->mean, w->m2, w->b, w->x);
            for (j = 0; j + 4 <= len; j += 4) {
                v4f a = vabs(vload(w->var + j));
                v4f keep = lo_at_zero ? v_at_zero(a - vlo) : v_above_zero(a - vlo);
                if (mode == 2) keep = keep * (hi_at_zero ? v_at_zero(vhi - a) : v_above_zero(vhi - a));
                vstore(m + j, keep);
            }
            for (; j < len; j++) {
                float a = tabs(w->var[j]), d = a - lo, e = hi - a;
                float keep = lo_at_zero ? (float)!(d < 0.0f) : (float)(d > 0.0f);
                if (mode == 2) keep = keep * (hi_at_zero ? (float)!(e < 0.0f) : (float)(e > 0.0f));
                m[j] = keep;
            }
        } else if (mode == 3) {
            for (j = 0; j < len; j++) m[j] = 0.0f;
        }
        const float *b = load(base, kinds[0], t0, len, w->b);
        for (int32_t i = 0; i < n; i++) {
            const float *x = load(xs[i], kinds[1 + i], t0, len, w->x);
            float *sq = w->var;  /* the variance is spent: its tile holds the squares */
            if (m) for (j = 0; j < len; j++) { float d = (x[j] - b[j]) * m[j]; sq[j] = d * d; }
            else for (j = 0; j < len; j++) { float d = x[j] - b[j]; sq[j] = d * d; }
            v4d l0 = acc[2 * i], l1 = acc[2 * i + 1];
            for (j = 0; j + 8 <= len; j += 8) {
                l0 = l0 + widen(vload(sq + j));
                l1 = l1 + widen(vload(sq + j + 4));
            }
            for (; j < len; j++) {
                if (j % 8 < 4) l0[j % 4] += (double)sq[j];
                else l1[j % 4] += (double)sq[j];
            }
            acc[2 * i] = l0;
            acc[2 * i + 1] = l1;
        }
    }
    memcpy(lanes, acc, (size_t)n * 8 * sizeof(double));
}

/* composer.methods.fusion._sce_erase_mean of the deltas (x_i - b) * mask (no mask: unmasked), weights w:
   the sign election on the unweighted deltas (as elect2's, keep_sign's +0 for torch's -0 changes no bit: the sums
   start at +0), erased_i = w_i * keep_i, b + sum(d_i * erased_i) / max(sum(erased_i), 1e-6) */
THREAD_BUFFER(float, sce_blend_scratch, [MAX_INPUTS][TILE])
void composer_sce_blend(const void *base, const void *const *xs, const int32_t *kinds, const float *mask,
                        int32_t n, const float *w, float *out, int64_t count) {
    TILE_BUFFERS;
    float (*d)[TILE] = (float (*)[TILE])sce_blend_scratch_get();
    for (int64_t t0 = 0; t0 < count; t0 += TILE) {
        int64_t len = count - t0 < TILE ? count - t0 : TILE;
        const float *b = load(base, kinds[0], t0, len, tile_b);
        for (int32_t i = 0; i < n; i++) {
            const float *x = load(xs[i], kinds[1 + i], t0, len, tile_x);
            float *di = d[i];
            for (int64_t j = 0; j < len; j++) di[j] = x[j] - b[j];
            if (mask) for (int64_t j = 0; j < len; j++) di[j] = di[j] * mask[t0 + j];
        }
        float *o = out + t0;
        int64_t j = 0;
        const v4f zero = vsplat(0.0f), floor_ = vsplat(1e-6f), one = vsplat(1.0f);
        for (; j + 4 <= len; j += 4) {  /* four at a time (the scalar form below compiles to branches) */
            v4f sum = zero;
            for (int32_t i = 0; i < n; i++) sum = sum + vload(d[i] + j);
            v4i positive = ~(sum < zero);
            v4f mixed = zero, div = zero;
            for (int32_t i = 0; i < n; i++) {
                v4f di = vload(d[i] + j);
                v4i k = (positive & (di > zero)) | (~positive & (di < zero));
                v4f e = vsplat(w[i]) * (v4f)(k & (v4i)one);
                mixed = mixed + di * e;
                div = div + e;
            }
            v4i small = div < floor_;
            div = (v4f)((small & (v4i)floor_) | (~small & (v4i)div));
            vstore(o + j, vload(b + j) + mixed / div);
        }
        for (; j < len; j++) {
            float sum = 0.0f;
            for (int32_t i = 0; i < n; i++) sum = sum + d[i][j];
            int majority = !(sum < 0.0f);
            float mixed = 0.0f, div = 0.0f;
            for (int32_t i = 0; i < n; i++) {
                float e = w[i] * keep_sign(d[i][j], majority);
                mixed = mixed + d[i][j] * e;
                div = div + e;
            }
            div = div < 1e-6f ? 1e-6f : div;
            o[j] = b[j] + mixed / div;
        }
    }
}
/* composer_hist16 of the deltas x - b, subtracted here (the same float32 subtraction as torch's); kinds: x's, b's */
void composer_hist16_delta(const void *x, const void *b, const int32_t *kinds, int64_t n, int64_t *hist) {
    TILE_BUFFERS;
    float *tx = tile_x, *tb = tile_b;
    Hist h = hist_begin();
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int64_t len = n - t0 < TILE ? n - t0 : TILE;
        if (kinds[0] == 1 && kinds[1] == 1) {  /* both bfloat16: converted in the loop (no tile copies) */
            const uint16_t *xh = (const uint16_t *)x + t0, *bh = (const uint16_t *)b + t0;
            for (int64_t j = 0; j < len; j++)
                h.keys[j] = hist_key(as_bits(as_float((uint32_t)xh[j] << 16) - as_float((uint32_t)bh[j] << 16)));
        } else {
            const float *xt = load(x, kinds[0], t0, len, tx), *bt = load(b, kinds[1], t0, len, tb);
            for (int64_t j = 0; j < len; j++) h.keys[j] = hist_key(as_bits(xt[j] - bt[j]));
        }
        hist_count(h, len);
        if ((t0 + len) % HIST_SPAN == 0) hist_flush(h, hist);
    }
    hist_flush(h, hist);
}

/* composer.methods.geometric.combination_blend (karcher, multislerp): acc = (x_0 - b) * c_0, then
   acc = acc + (x_i - b) * c_i in input order, then acc + b (without a base: x_i * c_i, no b); and
   composer.methods.averaging.model_stock_blend (mode 1, `c` its [t, 1 - t]): s = (x_0 + 0) + x_1 + ... (Python's
   sum from 0), then t * (s / n) + (1 - t) * b; mode 2 (nuslerp's flattened blend): the combination's sum, divided
   by c[n], then + b. One float32 rounding per operation, in that order. */
void composer_combination(const void *base, const void *const *xs, const int32_t *kinds, int32_t n,
                          const float *c, int32_t with_base, int32_t mode, float *out, int64_t count) {
    const int32_t stock = mode == 1;
    TILE_BUFFERS;
    for (int64_t t0 = 0; t0 < count; t0 += TILE) {
        int64_t len = count - t0 < TILE ? count - t0 : TILE;
        const float *b = with_base ? load(base, kinds[0], t0, len, tile_b) : 0;
        float *o = out + t0;
        for (int32_t i = 0; i < n; i++) {
            const float *x = load(xs[i], kinds[1 + i], t0, len, tile_x);
            if (stock) {
                if (i == 0) for (int64_t j = 0; j < len; j++) o[j] = x[j] + 0.0f;
                else for (int64_t j = 0; j < len; j++) o[j] = o[j] + x[j];
            } else if (with_base) {
                const float ci = c[i];
                if (i == 0) for (int64_t j = 0; j < len; j++) o[j] = (x[j] - b[j]) * ci;
                else for (int64_t j = 0; j < len; j++) o[j] = o[j] + (x[j] - b[j]) * ci;
            } else {
                const float ci = c[i];
                if (i == 0) for (int64_t j = 0; j < len; j++) o[j] = x[j] * ci;
                else for (int64_t j = 0; j < len; j++) o[j] = o[j] + x[j] * ci;
            }
        }
        if (stock) {
            const float t = c[0], rest = c[1], nf = (float)n;
            for (int64_t j = 0; j < len; j++) o[j] = t * (o[j] / nf) + rest * b[j];
        } else {
            if (mode == 2) { const float d = c[n]; for (int64_t j = 0; j < len; j++) o[j] = o[j] / d; }
            if (with_base) for (int64_t j = 0; j < len; j++) o[j] = o[j] + b[j];
        }
    }
}

/* composer.methods.common.add_l1_lanes: |v| and |v| * m (float32, as torch computes them) added into float64
   lanes[0..15] and lanes[16..31], element j into lane j % 16, each lane in index order */
#define LANES 16
static inline __attribute__((always_inline)) int64_t angle_run(const int32_t n, float (*d)[TILE], int64_t len,
                                                               v4d *acc) {
    v4d a[MAX_INPUTS * (MAX_INPUTS + 1)];  /* two per sum: lanes 0-3 and 4-7, independent chains of adds */
    const int32_t sums = n * (n + 1);
    for (int32_t q = 0; q < sums; q++) a[q] = acc[q];
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
        for (int32_t h = 0; h < 2; h++) {
            v4d w[MAX_INPUTS];
            for (int32_t i = 0; i < n; i++) w[i] = widen(vload(d[i] + j + 4 * h));
            int32_t q = 0;
            for (int32_t i = 0; i < n; i++, q++) a[2 * q + h] = a[2 * q + h] + w[i] * w[i];
            for (int32_t i = 0; i < n; i++)
                for (int32_t k = i + 1; k < n; k++, q++) a[2 * q + h] = a[2 * q + h] + w[i] * w[k];
        }
    }
    for (int32_t q = 0; q < sums; q++) acc[q] = a[q];
    return j;
}
/* composer.methods.averaging.add_angle_lanes (model_stock's and nuslerp's angles): for the vectors v_i (x_i - b,
   float32 subtractions; x_i without a base), the float64 products v_i * v_i for each i, then v_i * v_j for each
   pair i < j row by row (each exact in float64), element k into lane k % 8 of the pair's row of `lanes`
   [pairs, 8], each lane added to in index order */
static _Thread_local float angle_tiles_tls[MAX_INPUTS][TILE];
static __attribute__((noinline)) float (*angle_tiles(void))[TILE] { return angle_tiles_tls; }
void composer_angle_lanes(const void *base, const void *const *xs, const int32_t *kinds, int32_t n,
                          int32_t with_base, int64_t count, double *lanes) {
    TILE_BUFFERS;
    float *tb = tile_b, *tx = tile_x;
    float (*d)[TILE] = angle_tiles();
    int32_t pi[MAX_INPUTS * (MAX_INPUTS + 1) / 2], pj[MAX_INPUTS * (MAX_INPUTS + 1) / 2], pairs = 0;
    for (int32_t i = 0; i < n; i++) { pi[pairs] = i; pj[pairs] = i; pairs++; }
    for (int32_t i = 0; i < n; i++)
        for (int32_t j = i + 1; j < n; j++) { pi[pairs] = i; pj[pairs] = j; pairs++; }
    v4d acc[MAX_INPUTS * (MAX_INPUTS + 1)];
    memcpy(acc, lanes, (size_t)pairs * 8 * sizeof(double));
    for (int64_t t0 = 0; t0 < count; t0 += TILE) {  /* tiles start at multiples of 8: lane (t0 + j) % 8 = j % 8 */
        int64_t len = count - t0 < TILE ? count - t0 : TILE, j = 0;
        const float *b = with_base ? load(base, kinds[0], t0, len, tb) : 0;
        for (int32_t i = 0; i < n; i++) {
            const float *x = load(xs[i], kinds[1 + i], t0, len, tx);
            float *di = d[i];
            if (b) for (int64_t k = 0; k < len; k++) di[k] = x[k] - b[k];
            else memcpy(di, x, (size_t)len * sizeof *di);
        }
        switch (n) {  /* n a constant in each: the sums stay in registers */
            case 1: j = angle_run(1, d, len, acc); break;
            case 2: j = angle_run(2, d, len, acc); break;
            case 3: j = angle_run(3, d, len, acc); break;
            default: j = angle_run(4, d, len, acc); break;
        }
        for (; j < len; j++)
            for (int32_t q = 0; q < pairs; q++)
                acc[2 * q + (j % 8) / 4][j % 4] += (double)d[pi[q]][j] * (double)d[pj[q]][j];
    }
    memcpy(lanes, acc, (size_t)pairs * 8 * sizeof(double));
}
/* the lanes in registers: lanes 4i .. 4i + 3 of the magnitudes in m[i], of the kept parts in k[i] */
typedef struct { v4d m0, m1, m2, m3, k0, k1, k2, k3; } Lanes;
static inline Lanes lanes_in(const double *lanes) {
    Lanes l;
    memcpy(&l.m0, lanes, 32); memcpy(&l.m1, lanes + 4, 32); memcpy(&l.m2, lanes + 8, 32); memcpy(&l.m3, lanes + 12, 32);
    memcpy(&l.k0, lanes + 16, 32); memcpy(&l.k1, lanes + 20, 32); memcpy(&l.k2, lanes + 24, 32);
    memcpy(&l.k3, lanes + 28, 32);
    return l;
}
static inline void lanes_out(Lanes l, double *lanes) {
    memcpy(lanes, &l.m0, 32); memcpy(lanes + 4, &l.m1, 32); memcpy(lanes + 8, &l.m2, 32); memcpy(lanes + 12, &l.m3, 32);
    memcpy(lanes + 16, &l.k0, 32); memcpy(lanes + 20, &l.k1, 32); memcpy(lanes + 24, &l.k2, 32);
    memcpy(lanes + 28, &l.k3, 32);
}
/* |x - b| and |x - b| * keep of `len` elements into the lanes, element j into lane j % LANES: 16 at a time in
   registers, then one by one through memory */
static inline Lanes add_lanes(Lanes l, const float *x, const float *b, const float *keep, int64_t len,
                              double *lanes) {
    int64_t j = 0;
    for (; j + LANES <= len; j += LANES) {
        v4f a0 = vabs(vload(x + j) - vload(b + j)), a1 = vabs(vload(x + j + 4) - vload(b + j + 4));
        v4f a2 = vabs(vload(x + j + 8) - vload(b + j + 8)), a3 = vabs(vload(x + j + 12) - vload(b + j + 12));
        l.m0 += widen(a0); l.m1 += widen(a1); l.m2 += widen(a2); l.m3 += widen(a3);
        l.k0 += widen(a0 * vload(keep + j)); l.k1 += widen(a1 * vload(keep + j + 4));
        l.k2 += widen(a2 * vload(keep + j + 8)); l.k3 += widen(a3 * vload(keep + j + 12));
    }
    if (j == len) return l;
    lanes_out(l, lanes);
    for (; j < len; j++) {
        float a = tabs(x[j] - b[j]);
        lanes[j % LANES] += (double)a;
        lanes[LANES + j % LANES] += (double)(a * keep[j]);
    }
    return lanes_in(lanes);
}

void composer_lane_sums(const float *v, const float *m, int64_t n, double *lanes) {
    static const float zeros[TILE];
    Lanes l = lanes_in(lanes);
    for (int64_t t0 = 0; t0 < n; t0 += TILE)  /* TILE is a multiple of LANES: lane j % LANES throughout */
        l = add_lanes(l, v + t0, zeros, m + t0, n - t0 < TILE ? n - t0 : TILE, lanes);
    lanes_out(l, lanes);
}

static inline uint64_t splitmix_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static inline uint64_t splitmix_word(uint64_t key, uint64_t i) { return splitmix_mix(key + (i + 1) * 0x9E3779B97F4A7C15ull); }

/* How many of the 2**31 values h of 31 random bits bernoulli keeps for probability p: (float)h * 2**-31 < p holds
   exactly for h below the count, as the conversion rounds monotonically, so one integer comparison decides */
uint32_t composer_keep_count(float p) {
    uint32_t lo = 0, hi = 1u << 31;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if ((float)(int32_t)mid * 0x1p-31f < p) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* composer.methods.dare's rescale pass, one task vector x - b of n elements in one pass: the keep mask
   (composer.methods.sparsify.bernoulli with probability p from key's SplitMix64 words: element j's uniform number
   is the low (j even) or high half of word j / 2) packed into `bits` as composer.methods.common.pack_mask packs
   it, and |x - b|, |x - b| * mask added into `lanes` as composer_lane_sums adds them */
void composer_dare_pass(const void *x, const void *b, const int32_t *kinds, int64_t n, uint64_t key, float p,
                        uint8_t *bits, double *lanes) {
    TILE_BUFFERS;
    float keep[TILE + 1];
    uint32_t count = composer_keep_count(p);
    Lanes l = lanes_in(lanes);
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {  /* TILE is even: words do not straddle tiles */
        int64_t len = n - t0 < TILE ? n - t0 : TILE;
        uint64_t z0 = key + (uint64_t)(t0 / 2 + 1) * 0x9E3779B97F4A7C15ull;
        for (int64_t j = 0; j < len; j += 2, z0 += 0x9E3779B97F4A7C15ull) {  /* splitmix_word, incrementally */
            uint64_t z = splitmix_mix(z0);
            keep[j] = (float)(((uint32_t)z & 0x7fffffffu) < count);
            keep[j + 1] = (float)(((uint32_t)(z >> 32) & 0x7fffffffu) < count);
        }
        const float *xt = load(x, kinds[0], t0, len, tile_x), *bt = load(b, kinds[1], t0, len, tile_b);
        l = add_lanes(l, xt, bt, keep, len, lanes);
        composer_pack(keep, len, bits + t0 / 8);  /* TILE is a multiple of 8 */
    }
    lanes_out(l, lanes);
}

#ifdef DELLA_WIDE
/* composer_della_pass' steps after a row's probabilities, in AVX-512 (and DQ, for SplitMix64's 64-bit products):
   16 elements at a time, the 8 words of `key`'s stream that decide them (a word's low half the even element's,
   as splitmix_word's), below()'s comparison, the bits packed as composer_pack packs them (element j: bit j % 8),
   and add_lanes' sums, lane j % 16, in element order: the scalar steps' bits. n: a multiple of 16, `at` even. */
WIDE_TARGET static void della_keep_wide(const float *d, const float *p,
                                                                          int64_t n, int64_t at, uint64_t key,
                                                                          uint8_t *bits, Lanes *l) {
    const __m512i golden = _mm512_set1_epi64((long long)0x9E3779B97F4A7C15ull);
    const __m512i mix1 = _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ull);
    const __m512i mix2 = _mm512_set1_epi64((long long)0x94D049BB133111EBull);
    const __m512i low31 = _mm512_set1_epi32(0x7fffffff), magnitude = _mm512_set1_epi32(0x7fffffff);
    const __m512 scale = _mm512_set1_ps(0x1p-31f), zero = _mm512_setzero_ps(), unit = _mm512_set1_ps(1.0f);
    const __m512i step = _mm512_set1_epi64((long long)(8 * 0x9E3779B97F4A7C15ull));
    __m512i z0 = _mm512_add_epi64(_mm512_set1_epi64((long long)key),
                                  _mm512_mullo_epi64(_mm512_add_epi64(_mm512_set1_epi64(at / 2 + 1),
                                                                      _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)),
                                                     golden));
    __m512d m_lo = _mm512_insertf64x4(_mm512_castpd256_pd512((__m256d)l->m0), (__m256d)l->m1, 1);
    __m512d m_hi = _mm512_insertf64x4(_mm512_castpd256_pd512((__m256d)l->m2), (__m256d)l->m3, 1);
    __m512d k_lo = _mm512_insertf64x4(_mm512_castpd256_pd512((__m256d)l->k0), (__m256d)l->k1, 1);
    __m512d k_hi = _mm512_insertf64x4(_mm512_castpd256_pd512((__m256d)l->k2), (__m256d)l->k3, 1);
    for (int64_t j = 0; j < n; j += 16, z0 = _mm512_add_epi64(z0, step)) {
        __m512i z = _mm512_xor_si512(z0, _mm512_srli_epi64(z0, 30));
        z = _mm512_mullo_epi64(z, mix1);
        z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 27));
        z = _mm512_mullo_epi64(z, mix2);
        z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
        __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(z, low31)), scale);
        __mmask16 kept = _mm512_cmp_ps_mask(u, _mm512_loadu_ps(p + j), _CMP_LT_OQ);
        uint16_t packed = (uint16_t)kept;
        memcpy(bits + j / 8, &packed, 2);
        __m512 a = _mm512_castsi512_ps(_mm512_and_si512(
            _mm512_castps_si512(_mm512_sub_ps(_mm512_loadu_ps(d + j), zero)), magnitude));
        __m512 ak = _mm512_mul_ps(a, _mm512_mask_blend_ps(kept, zero, unit));
        m_lo = _mm512_add_pd(m_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(a)));
        m_hi = _mm512_add_pd(m_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))));
        k_lo = _mm512_add_pd(k_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(ak)));
        k_hi = _mm512_add_pd(k_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(ak), 1))));
    }
    l->m0 = (v4d)_mm512_castpd512_pd256(m_lo); l->m1 = (v4d)_mm512_extractf64x4_pd(m_lo, 1);
    l->m2 = (v4d)_mm512_castpd512_pd256(m_hi); l->m3 = (v4d)_mm512_extractf64x4_pd(m_hi, 1);
    l->k0 = (v4d)_mm512_castpd512_pd256(k_lo); l->k1 = (v4d)_mm512_extractf64x4_pd(k_lo, 1);
    l->k2 = (v4d)_mm512_castpd512_pd256(k_hi); l->k3 = (v4d)_mm512_extractf64x4_pd(k_hi, 1);
}
#endif

/* composer.methods.dare's rescale pass for DELLA, one task vector x - b of n_rows rows of `width` in one call: the
   deltas (into `deltas`), their keep probabilities as composer_della_probs makes them (into `probs`; `scratch` as
   it takes it), the mask bernoulli draws from them with key's words, packed into `bits`, and its L1 sums added
   into `lanes`, as composer_dare_pass */
void composer_della_pass(const void *x, const void *b, const int32_t *kinds, int64_t n_rows, int64_t width,
                         float base_p, float n_minus_1, float epsilon, uint64_t key, uint64_t *scratch,
                         float *deltas, float *probs, uint8_t *bits, double *lanes) {
    TILE_BUFFERS;
    static const float zeros[TILE];
    float keep[TILE + 1];
    int64_t n = n_rows * width;
    if (width % 16 == 0) {  /* row by row: a row's deltas, ranks and mask stay in the cache between the steps */
        const float *table = della_table(width, base_p, n_minus_1, epsilon, scratch), formula[3] = {base_p, n_minus_1, epsilon};
        float *tx = tile_x, *tb = tile_b;
        Lanes l = lanes_in(lanes);
        for (int64_t r0 = 0; r0 < n; r0 += width) {
            if (kinds[0] == 1 && kinds[1] == 1) {  /* bfloat16 both: converted as they are subtracted */
                const uint16_t *hx = (const uint16_t *)x + r0, *hb = (const uint16_t *)b + r0;
                for (int64_t j = 0; j < width; j++)
                    deltas[r0 + j] = as_float((uint32_t)hx[j] << 16) - as_float((uint32_t)hb[j] << 16);
            } else
            for (int64_t t0 = r0; t0 < r0 + width; t0 += TILE) {
                int64_t len = r0 + width - t0 < TILE ? r0 + width - t0 : TILE;
                const float *xt = load(x, kinds[0], t0, len, tx), *bt = load(b, kinds[1], t0, len, tb);
                for (int64_t j = 0; j < len; j++) deltas[t0 + j] = xt[j] - bt[j];
            }
            della_row((const uint32_t *)deltas + r0, width, table, formula, probs + r0, scratch);
#ifdef DELLA_WIDE
            if (wide()) {
                della_keep_wide(deltas + r0, probs + r0, width, r0, key, bits + r0 / 8, &l);
                continue;
            }
#endif
            for (int64_t t0 = r0; t0 < r0 + width; t0 += TILE) {  /* lanes and bits go on: t0 % 16 == 0 */
                int64_t len = r0 + width - t0 < TILE ? r0 + width - t0 : TILE;
                const float *pt = probs + t0;
                uint64_t z0 = key + (uint64_t)(t0 / 2 + 1) * 0x9E3779B97F4A7C15ull;
                for (int64_t j = 0; j < len; j += 2, z0 += 0x9E3779B97F4A7C15ull) {
                    uint64_t z = splitmix_mix(z0);
                    keep[j] = below((uint32_t)z, pt[j]);
                    keep[j + 1] = below((uint32_t)(z >> 32), pt[j + 1]);
                }
                l = add_lanes(l, deltas + t0, zeros, keep, len, lanes);
                composer_pack(keep, len, bits + t0 / 8);
            }
        }
        lanes_out(l, lanes);
        return;
    }
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int64_t len = n - t0 < TILE ? n - t0 : TILE;
        const float *xt = load(x, kinds[0], t0, len, tile_x), *bt = load(b, kinds[1], t0, len, tile_b);
        for (int64_t j = 0; j < len; j++) deltas[t0 + j] = xt[j] - bt[j];
    }
    composer_della_probs((const uint32_t *)deltas, n_rows, width, base_p, n_minus_1, epsilon, scratch, probs);
    Lanes l = lanes_in(lanes);
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int64_t len = n - t0 < TILE ? n - t0 : TILE;
        const float *pt = probs + t0;
        uint64_t z0 = key + (uint64_t)(t0 / 2 + 1) * 0x9E3779B97F4A7C15ull;
        for (int64_t j = 0; j < len; j += 2, z0 += 0x9E3779B97F4A7C15ull) {
            uint64_t z = splitmix_mix(z0);
            keep[j] = below((uint32_t)z, pt[j]);
            if (j + 1 < len) keep[j + 1] = below((uint32_t)(z >> 32), pt[j + 1]);
        }
        l = add_lanes(l, deltas + t0, zeros, keep, len, lanes);
        composer_pack(keep, len, bits + t0 / 8);
    }
    lanes_out(l, lanes);
}

/* composer.methods.sparsify.splitmix_words: word i of key's SplitMix64 stream, mix(key + (i + 1) * golden) */
void composer_splitmix(uint64_t key, int64_t n, uint64_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = splitmix_word(key, (uint64_t)i);
}

/* composer.ranked._nth_equal's step: the index of the rank-th (from 0, index order) of the n deltas x - b (as
   hist16_delta's) whose magnitude has the float32 bits `bits`; -1 - (how many there are) when fewer than rank + 1 */
int64_t composer_nth_equal_delta(const void *x, const void *b, const int32_t *kinds, int64_t n, uint32_t bits,
                                 int64_t rank) {
    TILE_BUFFERS;
    int64_t seen = 0;
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int64_t len = n - t0 < TILE ? n - t0 : TILE, here = 0;
        const float *xt = load(x, kinds[0], t0, len, tile_x), *bt = load(b, kinds[1], t0, len, tile_b);
        for (int64_t j = 0; j < len; j++) {
            float d = xt[j] - bt[j];
            uint32_t k;
            memcpy(&k, &d, sizeof k);
            here += (k & 0x7fffffffu) == bits;
        }
        if (rank < seen + here)
            for (int64_t j = 0; j < len; j++) {
                float d = xt[j] - bt[j];
                uint32_t k;
                memcpy(&k, &d, sizeof k);
                if ((k & 0x7fffffffu) == bits && seen++ == rank) return t0 + j;
            }
        seen += here;
    }
    return -1 - seen;
}
"""

_FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing", "-std=c11"]
_OFF = ("0", "false", "no", "off")
_LOCK = threading.Lock()
_LOADED: list = []  # [the library or None], once tried


def _cache_dir() -> Path:
    root = os.environ.get("COMPOSER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "composer")
    return Path(root) / "native"


def isa_flags() -> list[str]:
    """`-mavx2` where the CPU has AVX2 (x86-64, as torch detects it; `COMPOSER_NATIVE_AVX2=0`: never): the
    elementwise kernels' loops run 8 lanes wide instead of SSE2's 4 (TIES' blend 3.0 -> 2.0 ns per element here).
    The same bits: AVX2's float32 add, multiply, divide and compare round as SSE2's do, FMA is not enabled
    (-mfma is a flag of its own, and -ffp-contract=off forbids contraction anyway), and no float reduction is
    reordered (that needs -ffast-math). The build's cache key holds the flags: a cache shared with a CPU without
    AVX2 never hands it this build."""
    if os.environ.get("COMPOSER_NATIVE_AVX2", "1").strip().lower() in _OFF:
        return []
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError, RuntimeError):
        return []
    return ["-mavx2"] if capability in ("AVX2", "AVX512") else []


def _build() -> ctypes.CDLL | None:
    if os.environ.get("COMPOSER_NATIVE", "1").strip().lower() in _OFF:
        return None
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        return None
    isa = isa_flags()
    lib = _build_with(cc, [*isa, *_FLAGS])
    if lib is None and isa:  # a compiler that does not take the flag: the portable build
        lib = _build_with(cc, _FLAGS)
    if lib is not None:  # (one library per process for one build: its state outlives a reset)
        lib.composer_set_wide(0 if os.environ.get("COMPOSER_NATIVE_AVX512", "1").strip().lower() in _OFF else 1)
    return lib


def use_wide(on: bool) -> bool:
    """Let the kernels with AVX-512 forms (DELLA's rescale pass) use them where the CPU has them (the default;
    `COMPOSER_NATIVE_AVX512=0` at load: never), or not: their results are the same, so this is for tests and
    timing. Returns whether they are used now."""
    lib = library()
    if lib is None:
        return False
    lib.composer_set_wide(1 if on else 0)
    return bool(lib.composer_wide())


def _build_with(cc: str, flags: list[str]) -> ctypes.CDLL | None:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE, cc, version, *flags]).encode()).hexdigest()[:16]
        for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"composer-native-{os.getuid()}"):
            target = folder / f"kernels-{key}.so"
            if not target.exists():
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    with tempfile.TemporaryDirectory(dir=folder) as tmp:
                        src, lib = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
                        src.write_text(SOURCE)
                        built = subprocess.run([cc, *flags, "-o", str(lib), str(src)], capture_output=True,
                                               timeout=120)
                        if built.returncode != 0:
                            return None  # a compiler that cannot build it: the torch path
                        os.replace(lib, target)  # atomic: another process sees all of it or none
                except OSError:
                    continue  # an unwritable cache: the next folder
            lib = ctypes.CDLL(str(target))
            _declare(lib)
            return lib
    except (OSError, subprocess.SubprocessError):
        return None
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
    lib.composer_hist16.argtypes = [p, i64, p]
    lib.composer_hist16.restype = None
    lib.composer_hist16_delta.argtypes = [p, p, p, i64, p]
    lib.composer_hist16_delta.restype = None
    lib.composer_combination.argtypes = [p, p, p, i32, p, i32, i32, p, i64]
    lib.composer_combination.restype = None
    lib.composer_lane_sums.argtypes = [p, p, i64, p]
    lib.composer_angle_lanes.argtypes = [p, p, p, i32, i32, i64, p]
    lib.composer_angle_lanes.restype = None
    lib.composer_lane_sums.restype = None
    lib.composer_dare_pass.argtypes = [p, p, p, i64, ctypes.c_uint64, f32, p, p]
    lib.composer_dare_pass.restype = None
    lib.composer_della_pass.argtypes = [p, p, p, i64, i64, f32, f32, f32, ctypes.c_uint64, p, p, p, p, p]
    lib.composer_della_pass.restype = None
    lib.composer_keep_count.argtypes = [f32]
    lib.composer_keep_count.restype = ctypes.c_uint32
    lib.composer_splitmix.argtypes = [ctypes.c_uint64, i64, p]
    lib.composer_set_wide.argtypes = [ctypes.c_int]
    lib.composer_set_wide.restype = None
    lib.composer_wide.argtypes = []
    lib.composer_wide.restype = ctypes.c_int
    lib.composer_splitmix.restype = None
    lib.composer_nth_equal_delta.argtypes = [p, p, p, i64, ctypes.c_uint32, i64]
    lib.composer_nth_equal_delta.restype = i64
    lib.composer_sce_nth_equal.argtypes = [p, p, p, i32, i64, ctypes.c_uint32, i64]
    lib.composer_sce_nth_equal.restype = i64
    lib.composer_bernoulli.argtypes = [p, i64, f32, p]
    lib.composer_bernoulli.restype = None
    lib.composer_della_probs.argtypes = [p, i64, i64, f32, f32, f32, p, p]
    lib.composer_ram.argtypes = [p, p, p, i32, f32, p, p, p, i64]
    lib.composer_sce_var.argtypes = [p, p, p, i32, p, i64]
    lib.composer_sce_var.restype = None
    lib.composer_sce_var_hist.argtypes = [p, p, p, i32, i64, p]
    lib.composer_sce_var_hist.restype = None
    lib.composer_sce_masked_squares.argtypes = [p, p, p, i32, i32, f32, i32, f32, i32, p, p, i64]
    lib.composer_sce_masked_squares.restype = None
    lib.composer_sce_blend.argtypes = [p, p, p, p, i32, p, p, i64]
    lib.composer_sce_blend.restype = None
    lib.composer_fusion_blend.argtypes = [p, p, p, p, i64, i64, f32, p, i64]
    lib.composer_fusion_blend.restype = None
    lib.composer_sort_positions.argtypes = [p, i64, i64, p, p]
    lib.composer_order_statistics.argtypes = [p, i64, p, i32, p, p]
    lib.composer_order_statistics.restype = i32
    lib.composer_sort_positions.restype = None
    lib.composer_fusion_picked.argtypes = [p, p, p, i64, p, i64, i64, p]
    lib.composer_fusion_picked.restype = None
    lib.composer_ram.restype = None
    lib.composer_della_probs.restype = None
    lib.composer_pack.argtypes = [p, i64, p]
    lib.composer_pack.restype = None
    lib.composer_unpack.argtypes = [p, i64, i64, p]
    lib.composer_unpack.restype = None
    lib.composer_ties_blend.argtypes = [p, p, p, p, p, i32, p, p, p, p, p, p, p, p, p, i32, i32, f32, f32, p, i64]
    lib.composer_ties_blend.restype = None


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (the torch path)."""
    if not _LOADED:
        with _LOCK:
            if not _LOADED:
                _LOADED.append(_build())
    return _LOADED[0]


def reset() -> None:
    """Forget the loaded library: the next call builds or loads it again (tests, COMPOSER_NATIVE changes)."""
    with _LOCK:
        _LOADED.clear()


def _usable(t: Tensor) -> bool:
    import torch

    return t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"


def _kind(t: Tensor) -> int | None:
    """An input's kind for the kernels that convert as they load (0 float32, 1 bfloat16), None: not one they take
    (another dtype, not contiguous, not aligned to its element size, not on the CPU)."""
    import torch

    kind = {torch.float32: 0, torch.bfloat16: 1}.get(t.dtype)
    if kind is None or not t.is_contiguous() or t.device.type != "cpu" or t.data_ptr() % t.element_size():
        return None
    return kind


def _inputs(base: Tensor, xs: Sequence[Tensor]) -> tuple[ctypes.Array, ctypes.Array] | None:
    """The pointers and kinds (base's first) of inputs the kernels can take: 1..MAX_INPUTS of base's size, float32
    or bfloat16 (the mapped file's own, composer.methods.method.MergeJob.read_raw); else None."""
    kinds = [_kind(t) for t in (base, *xs)]
    if not 0 < len(xs) <= MAX_INPUTS or None in kinds or not all(x.numel() == base.numel() for x in xs):
        return None
    return (ctypes.c_void_p * len(xs))(*[x.data_ptr() for x in xs]), (ctypes.c_int32 * len(kinds))(*kinds)


def _out(base: Tensor) -> Tensor:
    import torch

    return torch.empty(base.shape, dtype=torch.float32)


def hist16(deltas: Tensor, hist: Tensor) -> bool:
    """Add pass 1's keys of float32 `deltas` to int64 `hist` (2**16 bins); False: not done (use torch)."""
    lib = library()
    if lib is None or not _usable(deltas):
        return False
    lib.composer_hist16(deltas.data_ptr(), deltas.numel(), hist.data_ptr())
    return True


def _delta_kinds(x: Tensor, base: Tensor) -> tuple[ctypes.CDLL, ctypes.Array] | None:
    """The library and the kinds (x's, then base's) for the kernels of one task vector x - base (inputs as _inputs
    takes them); None: not usable (use torch)."""
    lib, inputs = library(), _inputs(base, [x])
    if lib is None or inputs is None:
        return None
    return lib, (ctypes.c_int32 * 2)(inputs[1][1], inputs[1][0])


def hist16_delta(x: Tensor, base: Tensor, hist: Tensor) -> bool:
    """hist16 of the deltas x - base (float32 or bfloat16 inputs, as _inputs), subtracted in the same pass; False:
    not done (use torch)."""
    usable = _delta_kinds(x, base)
    if usable is None:
        return False
    lib, kinds = usable
    lib.composer_hist16_delta(x.data_ptr(), base.data_ptr(), kinds, x.numel(), hist.data_ptr())
    return True


def combination(base: Tensor | None, xs: Sequence[Tensor], coefficients: Sequence[float], *,
                stock: bool = False, divisor: float | None = None) -> Tensor | None:
    """composer.methods.geometric.combination_blend's sum of (x_i - base) * c_i (+ base; divided by `divisor`
    before adding the base, where given), or with `stock` model_stock_blend's t * mean(x_i) + (1 - t) * base
    (coefficients [t, 1 - t]); float32 values, of float32 or bfloat16 elements (as _inputs); None: not done (use
    torch)."""
    lib = library()
    if lib is None or (stock and base is None):
        return None
    inputs = _inputs(xs[0] if base is None else base, xs)
    if inputs is None:
        return None
    out = _out(xs[0])
    kinds = inputs[1]  # without a base, kinds[0] (xs[0]'s, standing in) is not read
    values = [*coefficients, *([] if divisor is None else [divisor])]
    c = (ctypes.c_float * max(2, len(values)))(*values)
    lib.composer_combination(None if base is None else base.data_ptr(), inputs[0], kinds, len(xs), c,
                             int(base is not None), 1 if stock else 0 if divisor is None else 2, out.data_ptr(),
                             out.numel())
    return out


def _lanes(lanes: Tensor) -> bool:
    import torch

    return lanes.dtype == torch.float64 and lanes.is_contiguous() and lanes.shape == (2, LANES)


def angle_lanes(base: Tensor | None, xs: Sequence[Tensor], lanes: Tensor) -> bool:
    """composer.methods.averaging.add_angle_lanes of the vectors x_i - base (x_i without a base; inputs as
    _inputs takes them) into float64 `lanes` [pairs, 8]; False: not done (use torch)."""
    import torch

    lib = library()
    inputs = None if lib is None or not xs else _inputs(xs[0] if base is None else base, xs)
    pairs = len(xs) * (len(xs) + 1) // 2
    if inputs is None or not (lanes.dtype == torch.float64 and lanes.is_contiguous() and lanes.shape == (pairs, 8)):
        return False
    lib.composer_angle_lanes(None if base is None else base.data_ptr(), inputs[0], inputs[1], len(xs),
                             int(base is not None), xs[0].numel(), lanes.data_ptr())
    return True


def lane_sums(v: Tensor, m: Tensor, lanes: Tensor) -> bool:
    """composer.methods.common.add_l1_lanes of float32 `v` and its 0/1 mask `m` (float32) into `lanes`; False: not
    done (use torch)."""
    lib = library()
    if lib is None or not (_usable(v) and _usable(m) and m.numel() == v.numel() and _lanes(lanes)):
        return False
    lib.composer_lane_sums(v.data_ptr(), m.data_ptr(), v.numel(), lanes.data_ptr())
    return True


def _della_scratch(n: int) -> Tensor:
    """della_row's scratch for rows of n: two rows of entries, a row of floats, the counts (2**15 uint32, zeroed),
    a row of uint32 (each element's count before it) and 2**15 uint32 (each bin's first rank)."""
    import torch

    scratch = torch.empty(2 * n + (n + 1) // 2 + (1 << 14) + (n + 1) // 2 + (1 << 14), dtype=torch.int64)
    scratch[2 * n + (n + 1) // 2:][: 1 << 14] = 0
    return scratch


def della_pass(x: Tensor, base: Tensor, width: int, density: float, epsilon: float, key: int, bits: Tensor,
               lanes: Tensor) -> bool:
    """DELLA's rescale pass over the task vector x - base (inputs as _inputs takes them, rows of `width`): the mask
    composer.methods.sparsify.della_mask draws with the stream of `key` (its probabilities as della_probs makes
    them) packed into uint8 `bits`, and composer.methods.common.add_l1_lanes of the deltas and the mask into
    `lanes`; False: not done (use torch)."""
    import torch

    from composer.methods.method import scratch as kept

    usable, n = _delta_kinds(x, base), x.numel()
    if usable is None or n % width or not (_lanes(lanes) and bits.dtype == torch.uint8 and bits.is_contiguous()
                                           and bits.numel() >= (n + 7) // 8):
        return False
    lib, kinds = usable
    work = kept("della-pass", 2, n)  # the deltas and their probabilities
    ranks = _della_scratch(width)
    lib.composer_della_pass(x.data_ptr(), base.data_ptr(), kinds, n // width, width, density - epsilon,
                            float(width - 1), epsilon, key % (1 << 64), ranks.data_ptr(), work[0].data_ptr(),
                            work[1].data_ptr(), bits.data_ptr(), lanes.data_ptr())
    return True


def keep_count(p: float) -> int | None:
    """How many of the 2**31 values of 31 random bits bernoulli keeps at probability p (dare_pass compares with
    it); None: no kernels."""
    lib = library()
    return None if lib is None else int(lib.composer_keep_count(p))


def dare_pass(x: Tensor, base: Tensor, key: int, p: float, bits: Tensor, lanes: Tensor) -> bool:
    """DARE's rescale pass over the task vector x - base (inputs as _inputs takes them): the keep mask drawn from
    `key` (composer.methods.sparsify.bernoulli(p, n, None, key=key)) packed into uint8 `bits`, and
    composer.methods.common.add_l1_lanes of |x - base| and its kept part into `lanes`; False: not done (use torch)."""
    import torch

    usable, n = _delta_kinds(x, base), x.numel()
    if usable is None or not (_lanes(lanes) and bits.dtype == torch.uint8 and bits.is_contiguous()
                              and bits.numel() >= (n + 7) // 8):
        return False
    lib, kinds = usable
    lib.composer_dare_pass(x.data_ptr(), base.data_ptr(), kinds, n, key % (1 << 64), p, bits.data_ptr(),
                           lanes.data_ptr())
    return True


def nth_equal_delta(x: Tensor, base: Tensor, bits: int, rank: int) -> int | None:
    """The index of the rank-th (from 0) of the deltas x - base (as hist16_delta's) whose |delta| has these float32
    bits; -1 - their count when there are not that many; None: not done (use torch)."""
    usable = _delta_kinds(x, base)
    if usable is None:
        return None
    lib, kinds = usable
    return int(lib.composer_nth_equal_delta(x.data_ptr(), base.data_ptr(), kinds, x.numel(), bits, rank))


def sce_nth_equal(base: Tensor, xs: Sequence[Tensor], bits: int, rank: int) -> int | None:
    """nth_equal_delta of sce_variance's variance of the task vectors x_i - base; None: not done (use torch)."""
    lib, inputs = library(), _inputs(base, xs)
    if lib is None or inputs is None:
        return None
    return int(lib.composer_sce_nth_equal(base.data_ptr(), *inputs, len(xs), base.numel(), bits, rank))


def splitmix(key: int, out: Tensor) -> bool:
    """composer.methods.sparsify.splitmix_words into int64 `out`; False: not done (use torch)."""
    import torch

    lib = library()
    if lib is None or out.dtype != torch.int64 or not out.is_contiguous():
        return False
    lib.composer_splitmix(key % (1 << 64), out.numel(), out.data_ptr())
    return True


def bernoulli(draws: Tensor, p: float | Tensor) -> Tensor | None:
    """composer.methods.sparsify.bernoulli's mask from its int32 draws, in their memory (returned as float32);
    None: not done (use torch)."""
    import torch

    lib = library()
    if lib is None or draws.dtype != torch.int32 or not draws.is_contiguous() or (
            isinstance(p, torch.Tensor) and not (_usable(p) and p.numel() == draws.numel())):
        return None
    tensor = isinstance(p, torch.Tensor)
    lib.composer_bernoulli(draws.data_ptr(), draws.numel(), 0.0 if tensor else float(p),
                           p.data_ptr() if tensor else None)
    return draws.view(torch.float32)


def della_probs(rows: Tensor, density: float, epsilon: float) -> Tensor | None:
    """composer.methods.sparsify.della_mask's keep probabilities for the rows of 2-D float32 `rows`; None: not
    done (use torch)."""
    import torch

    lib = library()
    if lib is None or rows.dim() != 2 or not _usable(rows):
        return None
    n_rows, n = rows.shape
    probs = torch.empty_like(rows)
    scratch = _della_scratch(n)
    lib.composer_della_probs(rows.data_ptr(), n_rows, n, density - epsilon, float(n - 1), epsilon,
                             scratch.data_ptr(), probs.data_ptr())
    return probs


def ram(base: Tensor, xs: Sequence[Tensor], epsilon: float, lambdas: Sequence[float] | None = None, *,
        counts: Tensor | None = None, merge: bool = True) -> Tensor | None | bool:
    """composer.methods.fusion's RAM merge (RAM+ with `lambdas`, float32 values) of float32 or bfloat16 elements
    (as _inputs), and/or (`counts`: int64 [n, 2], added to) each model's counts of changed and of uniquely changed
    elements; the merge (float32), True when counting only, or None: not done (use torch)."""
    import torch

    lib, inputs = library(), _inputs(base, xs)
    n = len(xs)
    if lib is None or inputs is None or counts is not None and not (
            counts.dtype == torch.int64 and counts.is_contiguous() and counts.numel() == 2 * n):
        return None
    out = _out(base) if merge else None
    scale = None if lambdas is None else (ctypes.c_float * n)(*lambdas)
    lib.composer_ram(base.data_ptr(), inputs[0], inputs[1], n, epsilon, scale,
                     None if counts is None else counts.data_ptr(), None if out is None else out.data_ptr(),
                     base.numel())
    return out if merge else True


def fusion_blend(base: Tensor, x: Tensor, kl: Tensor, offset: int, width: int, threshold: Tensor | float
                 ) -> Tensor | None:
    """composer.methods.fusion._fusion_blend of elements (float32 or bfloat16 inputs, as _inputs) that start at
    `offset` in the first of the rows (of `width` elements) whose KLs `kl` gives; None: not done (use torch)."""
    import torch

    usable = _delta_kinds(x, base)
    if usable is None or not _usable(kl) or (isinstance(threshold, torch.Tensor) and threshold.dtype != torch.float32):
        return None
    lib, kinds = usable
    kinds = (ctypes.c_int32 * 2)(kinds[1], kinds[0])  # base's, then x's
    out = torch.empty(base.shape, dtype=torch.float32)
    lib.composer_fusion_blend(base.data_ptr(), x.data_ptr(), kinds, kl.data_ptr(), offset, width, float(threshold),
                              out.data_ptr(), base.numel())
    return out


def order_statistics(x: Tensor, ranks: Sequence[int]) -> list[Tensor] | None:
    """composer.methods.fusion.order_statistics of a flat float32 tensor without NaN; None: not done."""
    import torch

    lib = library()
    if lib is None or not _usable(x) or not all(0 <= r < x.numel() for r in ranks):
        return None
    at = torch.tensor(list(ranks), dtype=torch.int64)
    out, scratch = torch.empty(len(ranks)), torch.empty(x.numel() + len(ranks), dtype=torch.int32)
    if lib.composer_order_statistics(x.data_ptr(), x.numel(), at.data_ptr(), len(ranks), out.data_ptr(),
                                     scratch.data_ptr()):
        return None
    return list(out.unbind())


def sort_positions(positions: Tensor, numel: int) -> Tensor | None:
    """torch.sort(positions).values of int64 positions in [0, numel), as int32 (numel <= 2**31), without torch's
    indices; None: not done (use torch)."""
    import torch

    lib = library()
    if lib is None or positions.dtype != torch.int64 or not positions.is_contiguous() or numel > 2**31:
        return None
    out, tmp = (torch.empty(positions.numel(), dtype=torch.int32) for _ in range(2))
    lib.composer_sort_positions(positions.data_ptr(), positions.numel(), numel, out.data_ptr(), tmp.data_ptr())
    return out


def fusion_picked(base: Tensor, x: Tensor, kl: Tensor, width: int, positions: Tensor, start: int) -> Tensor | None:
    """composer.methods.fusion's sampled importances at ascending int32 `positions` (absolute; all inside the
    piece) of a piece of whole float32 rows `base`, `x` starting at element `start`; None: not done."""
    import torch

    lib = library()
    if lib is None or not (_usable(base) and _usable(x) and _usable(kl) and x.numel() == base.numel()
                           and positions.dtype == torch.int32 and positions.is_contiguous()):
        return None
    out = torch.empty(positions.numel(), dtype=torch.float32)
    lib.composer_fusion_picked(base.data_ptr(), x.data_ptr(), kl.data_ptr(), width, positions.data_ptr(),
                               positions.numel(), start, out.data_ptr())
    return out


def sce_variance(base: Tensor, xs: Sequence[Tensor], out: Tensor | None = None) -> Tensor | None:
    """composer.methods.fusion._sce_variance of the task vectors x_i - base (into `out` when given); None: not
    done (use torch)."""
    import torch

    lib, inputs = library(), _inputs(base, xs)
    if lib is None or inputs is None or out is not None and not (_usable(out) and out.numel() == base.numel()):
        return None
    out = _out(base) if out is None else out
    lib.composer_sce_var(base.data_ptr(), *inputs, len(xs), out.data_ptr(), base.numel())
    return out


def sce_var_hist(base: Tensor, xs: Sequence[Tensor], hist: Tensor) -> bool:
    """Add hist16's keys of sce_variance's variance of the task vectors x_i - base to int64 `hist`, in one pass that
    stores no variance; False: not done (use torch)."""
    lib, inputs = library(), _inputs(base, xs)
    if lib is None or inputs is None:
        return False
    lib.composer_sce_var_hist(base.data_ptr(), *inputs, len(xs), base.numel(), hist.data_ptr())
    return True


def sce_masked_squares(base: Tensor, xs: Sequence[Tensor], steps: tuple | None, mask: Tensor | None,
                       lanes: Tensor) -> bool:
    """SCE's mean-squares pass over the task vectors x_i - base in one: with `steps` (composer.ranked.Keep.steps:
    () nothing kept, or (lo, kept at lo, hi or None, kept at hi)) the variance's mask into float32 `mask`, and the
    squares ((x_i - base) * mask)^2 (no mask: unmasked; a mask and no steps: that mask, as given) added to float64
    `lanes` [n, 8] as composer.methods.fusion.add_square_lanes adds them; False: not done (use torch)."""
    import torch

    lib, inputs = library(), _inputs(base, xs)
    if lib is None or inputs is None or not (lanes.dtype == torch.float64 and lanes.is_contiguous()
                                             and lanes.shape == (len(xs), 8)):
        return False
    if mask is None:
        mode, lo, low, hi, high = 0, 0.0, 0, 0.0, 0
    elif not (_usable(mask) and mask.numel() == base.numel()):
        return False
    elif steps is None:  # the mask made already (Keep.mask): only the squares
        mode, lo, low, hi, high = 4, 0.0, 0, 0.0, 0
    elif steps == ():
        mode, lo, low, hi, high = 3, 0.0, 0, 0.0, 0
    else:
        lo, low, hi, high = steps
        mode, hi, high = (1, 0.0, False) if hi is None else (2, hi, high)
    lib.composer_sce_masked_squares(base.data_ptr(), *inputs, len(xs), mode, lo, int(low), hi, int(high),
                                    None if mask is None else mask.data_ptr(), lanes.data_ptr(), base.numel())
    return True


def sce_blend(base: Tensor, xs: Sequence[Tensor], mask: Tensor | None, weights: Tensor,
              out: Tensor | None = None) -> Tensor | None:
    """composer.methods.fusion._sce_erase_mean of the task vectors x_i - base, times `mask` where given, with
    the float32 weights, into float32 `out` when given; None: not done (use torch)."""
    import torch

    lib, inputs = library(), _inputs(base, xs)
    if lib is None or inputs is None or mask is not None and not (
            _usable(mask) and mask.numel() == base.numel()) or weights.numel() != len(xs) or out is not None and not (
            _usable(out) and out.numel() == base.numel()):
        return None
    out = _out(base) if out is None else out
    w = (ctypes.c_float * len(xs))(*weights.to(torch.float32).tolist())
    lib.composer_sce_blend(base.data_ptr(), *inputs, None if mask is None else mask.data_ptr(), len(xs), w,
                           out.data_ptr(), base.numel())
    return out


def pack(mask: Tensor, out: Tensor | None = None) -> Tensor | None:
    """composer.methods.common.pack_mask of a float32 0/1 mask (into `out` when given); None: not done (use
    torch)."""
    import torch

    lib = library()
    size = (mask.numel() + 7) // 8
    if lib is None or not _usable(mask) or out is not None and not (
            out.dtype == torch.uint8 and out.is_contiguous() and out.numel() == size):
        return None
    out = torch.empty(size, dtype=torch.uint8) if out is None else out
    lib.composer_pack(mask.data_ptr(), mask.numel(), out.data_ptr())
    return out


def unpack(packed: Tensor, start: int, stop: int) -> Tensor | None:
    """composer.methods.common.unpack_mask; None: not done (use torch)."""
    import torch

    lib = library()
    if lib is None or packed.dtype != torch.uint8 or not packed.is_contiguous():
        return None
    out = torch.empty(stop - start)
    lib.composer_unpack(packed.data_ptr(), start, stop - start, out.data_ptr())
    return out


class Packed(NamedTuple):
    """A ties_blend step: multiply by the packed mask (composer.methods.common.pack_mask) `data`'s elements from
    `start` on."""

    data: Tensor
    start: int


def ties_blend(base: Tensor, xs: Sequence[Tensor], steps: Sequence[tuple | None], factors: Sequence[float | None],
               weights: Tensor, *, consensus: bool, normalize: bool, divisor: float, lambda_: float,
               out: Tensor | None = None) -> Tensor | None:
    """The blend of composer.methods.taskvectors._task_arithmetic, its sparsification fused; None: not done (use
    torch). `steps[i]`: None to keep everything, () to keep nothing, a float32 tensor to multiply by (a mask
    drawn beforehand), a Packed mask to multiply by, else (lo, lo_at_zero, hi or None, hi_at_zero) as
    composer.ranked.Keep.steps gives them. `weights`: float32, one per task vector. Into float32 `out` (base's
    size, contiguous) when given."""
    import torch

    lib, inputs = library(), _inputs(base, xs)
    n = len(xs)
    if lib is None or inputs is None or out is not None and not (_usable(out) and out.numel() == base.numel()) or not all(
            _usable(s) and s.numel() == base.numel() for s in steps if isinstance(s, torch.Tensor)) or not all(
            s.data.dtype == torch.uint8 and s.data.is_contiguous() and s.data.numel() * 8 >= s.start + base.numel()
            for s in steps if isinstance(s, Packed)):
        return None
    out = _out(base) if out is None else out
    i32 = ctypes.c_int32 * n
    f32 = ctypes.c_float * n
    kinds = [3 if isinstance(s, torch.Tensor) else 4 if isinstance(s, Packed) else 0 if s is None else 1 if s == ()
             else 2 for s in steps]
    mode = i32(*kinds)
    masks = (ctypes.c_void_p * n)(*[s.data.data_ptr() if k == 4 else s.data_ptr() if k == 3 else None
                                    for s, k in zip(steps, kinds)])
    starts = (ctypes.c_int64 * n)(*[s.start if k == 4 else 0 for s, k in zip(steps, kinds)])
    real = [s if k == 2 else (0.0, False, None, False) for s, k in zip(steps, kinds)]
    lo = f32(*[s[0] for s in real])
    lowz = i32(*[int(bool(s[1])) for s in real])
    hi = f32(*[0.0 if s[2] is None else s[2] for s in real])
    highz = i32(*[int(bool(s[3])) for s in real])
    unbounded = i32(*[int(s[2] is None) for s in real])
    factor = f32(*[0.0 if f is None else f for f in factors])
    has_factor = i32(*[int(f is not None) for f in factors])
    w = f32(*weights.tolist())
    lib.composer_ties_blend(base.data_ptr(), *inputs, masks, starts, n, mode, lo, lowz, hi, highz, unbounded,
                            factor, has_factor, w, int(consensus), int(normalize), divisor, lambda_, out.data_ptr(),
                            base.numel())
    return out
