// gpudiff: afw MEANCLIP / VARIANCECLIP of every column of a deep (N, B) stack, unit weights,
// without a sort: the binned background (a 128² bin is a column of 16384 samples) and the
// whole-image clip (one column of H·W samples).  docs/algorithms.md §0.5.
//
// NumPy twin: gpudiff.backend.reference_columns.clipped_columns (the same semantics; its sums run
// in sample order, these in a fixed block-reduction order, so the float64 sums may differ
// in the last bits and the float32 results by an ulp at most in practice).  Loaded by
// gpudiff.backend.launchers with cupy.RawModule (NVRTC) and compiled standalone by CI with
// `nvcc -arch=sm_90 -cubin`.  No headers are included; the per-block code is
// __host__ __device__ (on the host a block is one thread and the blocks of a phase run in
// order) so the test suite can run the very same code on a CPU.
//
// Layout: sample k of column c is data[c * col_stride + k * sample_stride] (strides in
// elements, so both (N, B) C-ordered stacks and transposed views work); good likewise
// (uint8, nonzero = usable).  valid = good && (good_is_finite || isfinite(x)).  Bin mode
// (the registered ``clipped_bins``): the columns are the bins of an image, read in place
// (no stack copied), sample k of a bin its pixel (k / wmax, k % wmax).
//
// Algorithm (one column split over `nsplit` blocks, each taking a contiguous chunk):
//   phases 0-3  exact order statistics by a radix select over the sortable uint32 keys of
//               the float32 samples, 8 bits per phase, most significant first: phase 0
//               histograms the top byte of every valid key (and counts the valid and good
//               samples); phases 1-3 histogram, for each of the six wanted ranks, the next
//               byte of the keys that share the rank's prefix.  The six ranks are the two
//               neighbours (lo, lo + 1) of q1, the median and q3 at idx = f·(n-1) (afw
//               medianAndQuartiles, linear interpolation).  After phase 3 the ranks'
//               keys are complete: the quartiles give the pass-0 centre (median) and
//               half-width nsigma·0.741301109252802·IQR.
//   phases 4..  the niter clipping passes: a sample survives if |x - centre| <= half-width
//               (float64 d = x - centre); survivors' count, Σd and Σd² are reduced in
//               float64; mean = Σd/W + centre, var = (Σd²/W - (Σd/W)²)·W²/(W² - W), with
//               IEEE rules for the degenerate cases (no survivor: 0/0 = NaN; one survivor:
//               0·∞ = NaN), exactly the twin's arithmetic.  A pass i > 0 uses the previous
//               pass's mean and nsigma·sqrt(var) (the IQR width when n <= 1).
// Select-only launches (phases 0-3, `fracs` and `out_q` given: the registered
// ``quantile_columns``, twin gpudiff.backend.reference_columns.quantile_columns) find up to three
// caller-given fractions per column instead of the quartiles and write numpy's linear
// percentiles (float64 from the exact float32 order statistics).
// A phase's partial results (histograms, counts, partial sums) go to global memory; the
// last block of a column to finish the phase (an arrival counter) folds them in a fixed
// order and writes the column's state for the next phase, so every result is
// deterministic.  With nsplit == 1 one launch runs all phases; otherwise the launcher
// launches each phase once (a launch boundary orders the phases).
// Floating-point contraction is disabled by hand (__dmul_rn/__dadd_rn/__dsub_rn).

namespace gd_cc {

// ranks selected per column: lo of q1, median, q3, then hi of each
constexpr int kRanks = 6;
constexpr int kBins = 256;  // 8 bits per radix phase
constexpr int kSelectPhases = 4;
// per-column integer state (int64 words)
constexpr int kSI = 16;
constexpr int kPrefix = 0;   // [kRanks] key bits found so far
constexpr int kRem = 6;      // [kRanks] rank left inside the prefix's bin; -1: empty column
constexpr int kN = 12;       // valid samples
constexpr int kNGood = 13;   // good flags
constexpr int kSumW = 14;    // survivors of the current clipping pass
constexpr int kArrived = 15; // blocks done with the current phase
// per-column float64 state
constexpr int kSD = 4;
constexpr int kCenter = 0;
constexpr int kHWidth = 1;
constexpr int kIqrWidth = 2;

constexpr double kIqToStdev = 0.741301109252802;

__host__ __device__ inline double nan_d() {
    union { unsigned long long u; double d; } c;
    c.u = 0x7ff8000000000000ULL;
    return c.d;
}

__host__ __device__ inline double mul(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}

__host__ __device__ inline double add(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dadd_rn(a, b);
#else
    return a + b;
#endif
}

__host__ __device__ inline double sub(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dsub_rn(a, b);
#else
    return a - b;
#endif
}

__host__ __device__ inline unsigned int float_bits(float v) {
    union { float f; unsigned int u; } c;
    c.f = v;
    return c.u;
}

__host__ __device__ inline bool finite_f(float v) {
    return (float_bits(v) & 0x7f800000u) != 0x7f800000u;
}

// float32 -> uint32 in the order of the values (gpudiff.ops.selection._sortable_keys)
__host__ __device__ inline unsigned int sortable_key(float v) {
    const unsigned int u = float_bits(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__host__ __device__ inline float key_to_float(unsigned int k) {
    union { unsigned int u; float f; } c;
    c.u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return c.f;
}

__host__ __device__ inline void block_sync() {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
}

// Make this thread's global writes visible to the other blocks before it signals.
__host__ __device__ inline void fence() {
#ifdef __CUDA_ARCH__
    __threadfence();
#endif
}

__host__ __device__ inline unsigned long long global_add(unsigned long long* p,
                                                         unsigned long long v) {
#ifdef __CUDA_ARCH__
    return atomicAdd(p, v);
#else
    const unsigned long long old = *p;
    *p = old + v;
    return old;
#endif
}

__host__ __device__ inline void global_add_u32(unsigned int* p, unsigned int v) {
#ifdef __CUDA_ARCH__
    atomicAdd(p, v);
#else
    *p += v;
#endif
}

// One count into a shared histogram; slot < 0 adds nothing.  Every thread of the block must
// call it the same number of times (the warp's lanes agree on their slots first, so the
// many samples of a narrow sky distribution cost one atomic per distinct slot and warp).
__host__ __device__ inline void hist_add(unsigned int* sh_hist, int slot) {
#ifdef __CUDA_ARCH__
    const unsigned int peers = __match_any_sync(0xffffffffu, slot);
    const int lane = threadIdx.x & 31;
    if (slot >= 0 && lane == __ffs(peers) - 1) atomicAdd(&sh_hist[slot], __popc(peers));
#else
    if (slot >= 0) sh_hist[slot] += 1;
#endif
}

// Block-wide sum in a fixed order (lanes by shuffles, then the warps' partials by warp 0);
// every thread gets the total.  sh holds 32 values.
template <typename T>
__host__ __device__ inline T block_sum(T v, T* sh, int tid, int nthr) {
#ifdef __CUDA_ARCH__
    const int lane = tid & 31, warp = tid >> 5, nwarp = (nthr + 31) >> 5;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    block_sync();  // sh may still be read from a previous call
    if (lane == 0) sh[warp] = v;
    block_sync();
    if (warp == 0) {
        T w = lane < nwarp ? sh[lane] : T(0);
        for (int off = 16; off > 0; off >>= 1) w += __shfl_down_sync(0xffffffffu, w, off);
        if (lane == 0) sh[0] = w;
    }
    block_sync();
    return sh[0];
#else
    (void)sh;
    (void)tid;
    (void)nthr;
    return v;
#endif
}

// float64 sums need the unfused adds: a separate instance.
__host__ __device__ inline double block_sum_d(double v, double* sh, int tid, int nthr) {
#ifdef __CUDA_ARCH__
    const int lane = tid & 31, warp = tid >> 5, nwarp = (nthr + 31) >> 5;
    for (int off = 16; off > 0; off >>= 1) v = add(v, __shfl_down_sync(0xffffffffu, v, off));
    block_sync();
    if (lane == 0) sh[warp] = v;
    block_sync();
    if (warp == 0) {
        double w = lane < nwarp ? sh[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) w = add(w, __shfl_down_sync(0xffffffffu, w, off));
        if (lane == 0) sh[0] = w;
    }
    block_sync();
    return sh[0];
#else
    (void)sh;
    (void)tid;
    (void)nthr;
    return v;
#endif
}

struct Args {
    const float* data;
    const unsigned char* good;
    long long n;  // samples per column
    long long s_sample, s_col, g_sample, g_col;
    int nsplit;
    double nsigma;
    int niter;
    int good_is_finite;
    unsigned int* ghist;  // [B][kRanks][kBins], zero between phases
    long long* st_i;      // [B][kSI], zero on entry
    double* st_d;         // [B][kSD]
    double* part;         // [B][nsplit][2]
    float* out_mean;
    float* out_var;
    int* out_n;
    long long* out_ngood;
    const double* fracs;  // [B][3] quantile fractions (< 0: unused), or null: the quartiles
    double* out_q;        // [B][3] the quantiles (select-only launches), or null
    // Bin mode (ye non-null): column c is bin (c / nx, c % nx) of an image, rows
    // ye[by]..ye[by+1), columns xe[bx]..xe[bx+1); sample k is its pixel (k / wmax, k % wmax)
    // (beyond the bin's own size: padding, not usable).  Pixel (r, x) of the image is
    // data[r * s_col + x * s_sample], good[r * g_col + x * g_sample].
    const long long* ye;
    const long long* xe;
    int nx;
    long long wmax;
};

// Sample k of column col: its value, and whether it is flagged good.
__host__ __device__ inline bool load(const Args& a, int col, long long k, float* v) {
    if (a.ye == nullptr) {
        *v = a.data[(long long)col * a.s_col + k * a.s_sample];
        return a.good[(long long)col * a.g_col + k * a.g_sample] != 0;
    }
    const int by = col / a.nx, bx = col % a.nx;
    const long long r = a.ye[by] + k / a.wmax, x = a.xe[bx] + k % a.wmax;
    if (r >= a.ye[by + 1] || x >= a.xe[bx + 1]) {
        *v = 0.0f;
        return false;
    }
    *v = a.data[r * a.s_col + x * a.s_sample];
    return a.good[r * a.g_col + x * a.g_sample] != 0;
}

struct Block {
    int tid, nthr;
    unsigned int* sh_hist;  // kRanks * kBins
    long long* sh_i;        // 32
    double* sh_d;           // 32
    int* sh_flag;
};

// The arrival counter: true in every thread of the block that finishes the phase last.
__host__ __device__ inline bool last_to_arrive(const Block& b, const Args& a, long long* si) {
    fence();
    block_sync();
    if (b.tid == 0) {
        const unsigned long long prev =
            global_add(reinterpret_cast<unsigned long long*>(&si[kArrived]), 1ULL);
        *b.sh_flag = (prev == (unsigned long long)(a.nsplit - 1)) ? 1 : 0;
    }
    block_sync();
    const bool last = *b.sh_flag != 0;
    if (last) fence();
    return last;
}

// Fraction j (0-2) of column col: the quartiles, or the caller's (< 0: unused).
__host__ __device__ inline double fraction(const Args& a, int col, int j) {
    if (a.fracs == nullptr) return j == 0 ? 0.25 : (j == 1 ? 0.50 : 0.75);
    return a.fracs[(long long)col * 3 + j];
}

// Rank r of the column: lo (r < 3) or hi (r >= 3) neighbour of fraction r % 3 at
// idx = f·(n-1), as numpy's linear percentile; -1 when there is none to find.
__host__ __device__ inline long long rank_of(const Args& a, int col, long long n, int r) {
    const double fr = fraction(a, col, r % 3);
    if (n == 0 || !(fr >= 0.0)) return -1;
    const long long nm1 = n - 1;
    const long long lo = (long long)mul(fr, (double)nm1);
    return (r < 3) ? lo : (lo + 1 < nm1 ? lo + 1 : nm1);
}

// Phases 0-3: one byte of the radix select.
__host__ __device__ inline void select_phase(const Block& b, const Args& a, int col, int g,
                                             int level) {
    long long* si = a.st_i + (long long)col * kSI;
    double* sd = a.st_d + (long long)col * kSD;
    unsigned int* gh = a.ghist + (long long)col * kRanks * kBins;
    const int shift = 24 - 8 * level;
    const int nr = level == 0 ? 1 : kRanks;  // phase 0: one histogram serves every rank
    unsigned int pre[kRanks];
    bool live[kRanks];
    for (int r = 0; r < kRanks; ++r) {
        pre[r] = level == 0 ? 0u : (unsigned int)si[kPrefix + r];
        live[r] = level == 0 || si[kRem + r] >= 0;
    }
    for (int i = b.tid; i < nr * kBins; i += b.nthr) b.sh_hist[i] = 0u;
    block_sync();
    const long long chunk = (a.n + a.nsplit - 1) / a.nsplit;
    const long long k0 = (long long)g * chunk;
    const long long k1 = (k0 + chunk < a.n) ? k0 + chunk : a.n;
    long long nvalid = 0, ngood = 0;
    for (long long base = k0; base < k1; base += b.nthr) {  // the same trips for every lane
        const long long k = base + b.tid;
        bool ok = false;
        unsigned int key = 0u;
        if (k < k1) {
            float v;
            const bool gd = load(a, col, k, &v);
            ok = gd && (a.good_is_finite || finite_f(v));
            key = sortable_key(v);
            ngood += gd ? 1 : 0;
            nvalid += ok ? 1 : 0;
        }
        for (int r = 0; r < nr; ++r) {
            const bool match =
                ok && live[r] && (level == 0 || (key >> (shift + 8)) == (pre[r] >> (shift + 8)));
            hist_add(b.sh_hist, match ? r * kBins + (int)((key >> shift) & 0xffu) : -1);
        }
    }
    if (level == 0) {
        const long long tv = block_sum<long long>(nvalid, b.sh_i, b.tid, b.nthr);
        const long long tg = block_sum<long long>(ngood, b.sh_i, b.tid, b.nthr);
        if (b.tid == 0) {
            global_add(reinterpret_cast<unsigned long long*>(&si[kN]), (unsigned long long)tv);
            global_add(reinterpret_cast<unsigned long long*>(&si[kNGood]),
                       (unsigned long long)tg);
        }
    }
    block_sync();
    for (int i = b.tid; i < nr * kBins; i += b.nthr) {
        if (b.sh_hist[i] != 0u) global_add_u32(&gh[i], b.sh_hist[i]);
    }
    if (!last_to_arrive(b, a, si)) return;

    // the column's last block: locate every rank's byte, then clear the histograms
    volatile long long* vsi = si;
    volatile unsigned int* vgh = gh;
    const long long n = vsi[kN];
    for (int r = b.tid; r < kRanks; r += b.nthr) {  // a thread per rank
        long long rem;
        unsigned int prefix;
        if (level == 0) {
            rem = rank_of(a, col, n, r);
            prefix = 0u;
        } else {
            rem = vsi[kRem + r];
            prefix = (unsigned int)vsi[kPrefix + r];
        }
        if (rem >= 0) {
            const int h = level == 0 ? 0 : r;
            int bin = kBins - 1;
            for (int j = 0; j < kBins; ++j) {
                const long long c = (long long)vgh[h * kBins + j];
                if (rem < c) {
                    bin = j;
                    break;
                }
                rem -= c;
            }
            prefix |= (unsigned int)bin << shift;
        }
        si[kRem + r] = rem;
        si[kPrefix + r] = (long long)prefix;
    }
    block_sync();
    for (int i = b.tid; i < nr * kBins; i += b.nthr) gh[i] = 0u;
    if (b.tid == 0) {
        if (level == kSelectPhases - 1 && a.out_q != nullptr) {
            // select-only: numpy's linear percentiles, (lo + 1 - idx)·v_lo + (idx - lo)·v_hi
            for (int j = 0; j < 3; ++j) {
                const double fr = fraction(a, col, j);
                double q = nan_d();
                if (n > 0 && fr >= 0.0) {
                    const double idx = mul(fr, (double)(n - 1));
                    const double lo_f = (double)(long long)idx;
                    const double v_lo = (double)key_to_float((unsigned int)si[kPrefix + j]);
                    const double v_hi = (double)key_to_float((unsigned int)si[kPrefix + 3 + j]);
                    q = add(mul(sub(add(lo_f, 1.0), idx), v_lo), mul(sub(idx, lo_f), v_hi));
                }
                a.out_q[(long long)col * 3 + j] = q;
            }
        } else if (level == kSelectPhases - 1) {
            // pass 0 of the clip: median and IQR, as the twin's quartiles
            double q[3];
            for (int j = 0; j < 3; ++j) {
                if (n == 0) {
                    q[j] = nan_d();
                    continue;
                }
                const double fr = j == 0 ? 0.25 : (j == 1 ? 0.50 : 0.75);
                const double idx = mul(fr, (double)(n - 1));
                const long long lo = (long long)idx;
                const double w_hi = sub(idx, (double)lo);
                const double w_lo = sub(1.0, w_hi);
                const double v_lo = (double)key_to_float((unsigned int)si[kPrefix + j]);
                const double v_hi = (double)key_to_float((unsigned int)si[kPrefix + 3 + j]);
                q[j] = add(mul(w_lo, v_lo), mul(w_hi, v_hi));
            }
            const double iqr_width = mul(mul(a.nsigma, kIqToStdev), sub(q[2], q[0]));
            sd[kCenter] = q[1];
            sd[kHWidth] = iqr_width;
            sd[kIqrWidth] = iqr_width;
        }
        si[kArrived] = 0;
    }
    fence();
    block_sync();
}

// Phases 4..: clipping pass `it`.
__host__ __device__ inline void clip_phase(const Block& b, const Args& a, int col, int g,
                                           int it) {
    long long* si = a.st_i + (long long)col * kSI;
    double* sd = a.st_d + (long long)col * kSD;
    const double center = sd[kCenter];
    const double hwidth = sd[kHWidth];
    const long long chunk = (a.n + a.nsplit - 1) / a.nsplit;
    const long long k0 = (long long)g * chunk;
    const long long k1 = (k0 + chunk < a.n) ? k0 + chunk : a.n;
    long long cnt = 0;
    double sx = 0.0, sx2 = 0.0;
    for (long long k = k0 + b.tid; k < k1; k += b.nthr) {
        float v;
        if (!load(a, col, k, &v) || !(a.good_is_finite || finite_f(v))) continue;
        const double d = sub((double)v, center);
        if (!(fabs(d) <= hwidth)) continue;  // NaN centre or width: nothing survives
        ++cnt;
        sx = add(sx, d);
        sx2 = add(sx2, mul(d, d));
    }
    const long long tc = block_sum<long long>(cnt, b.sh_i, b.tid, b.nthr);
    const double tx = block_sum_d(sx, b.sh_d, b.tid, b.nthr);
    const double tx2 = block_sum_d(sx2, b.sh_d, b.tid, b.nthr);
    if (b.tid == 0) {
        double* p = a.part + ((long long)col * a.nsplit + g) * 2;
        p[0] = tx;
        p[1] = tx2;
        global_add(reinterpret_cast<unsigned long long*>(&si[kSumW]), (unsigned long long)tc);
    }
    if (!last_to_arrive(b, a, si)) return;

    if (b.tid == 0) {
        volatile long long* vsi = si;
        volatile double* vp = a.part + (long long)col * a.nsplit * 2;
        double sumx = 0.0, sumx2 = 0.0;
        for (int j = 0; j < a.nsplit; ++j) {  // the blocks' partials in block order
            sumx = add(sumx, vp[2 * j]);
            sumx2 = add(sumx2, vp[2 * j + 1]);
        }
        const long long nused = vsi[kSumW];
        const long long n = vsi[kN];
        const double sumw = (double)nused;
        const double mean_d = sumx / sumw;  // no survivor: 0/0 = NaN
        const double w2 = mul(sumw, sumw);
        // one survivor: (d² − d²)·(1/0) = 0·∞ = NaN
        const double var = mul(sub(sumx2 / sumw, mul(mean_d, mean_d)), w2 / sub(w2, sumw));
        const double mean = add(mean_d, center);
        if (it == a.niter - 1) {
            a.out_mean[col] = (float)mean;
            a.out_var[col] = (float)var;
            a.out_n[col] = (int)nused;
            a.out_ngood[col] = vsi[kNGood];
        } else {
            sd[kCenter] = mean;
            sd[kHWidth] = n > 1 ? mul(a.nsigma, sqrt(var)) : sd[kIqrWidth];
        }
        si[kSumW] = 0;
        si[kArrived] = 0;
    }
    fence();
    block_sync();
}

__host__ __device__ inline void run_phase(const Block& b, const Args& a, int col, int g,
                                          int phase) {
    if (phase < kSelectPhases) {
        select_phase(b, a, col, g, phase);
    } else {
        clip_phase(b, a, col, g, phase - kSelectPhases);
    }
}

}  // namespace gd_cc

// Block (c·nsplit + g) works on chunk g of column c, phases [phase0, phase1).  Several
// phases per launch need nsplit == 1 (the launcher's rule): a phase's last block must be
// the only one of its column, or it could fold partials another block has not written.
extern "C" __global__ void clipped_columns_f32(
    const float* __restrict__ data, const unsigned char* __restrict__ good, long long n,
    int ncols, long long s_sample, long long s_col, long long g_sample, long long g_col,
    int nsplit, double nsigma, int niter, int good_is_finite, int phase0, int phase1,
    unsigned int* ghist, long long* st_i, double* st_d, double* part, float* out_mean,
    float* out_var, int* out_n, long long* out_ngood, const double* fracs, double* out_q,
    const long long* ye, const long long* xe, int nx, long long wmax) {
    __shared__ unsigned int sh_hist[gd_cc::kRanks * gd_cc::kBins];
    __shared__ long long sh_i[32];
    __shared__ double sh_d[32];
    __shared__ int sh_flag;
    const int col = (int)(blockIdx.x / (unsigned int)nsplit);
    const int g = (int)(blockIdx.x % (unsigned int)nsplit);
    if (col >= ncols) return;
    const gd_cc::Args a{data,   good,  n,        s_sample,       s_col,   g_sample, g_col,
                        nsplit, nsigma, niter,   good_is_finite, ghist,   st_i,     st_d,
                        part,   out_mean, out_var, out_n,         out_ngood, fracs, out_q,
                        ye,     xe,       nx,      wmax};
    const gd_cc::Block b{(int)threadIdx.x, (int)blockDim.x, sh_hist, sh_i, sh_d, &sh_flag};
    for (int ph = phase0; ph < phase1; ++ph) gd_cc::run_phase(b, a, col, g, ph);
}
