// gpudiff: afw MEANCLIP / VARIANCECLIP along axis 0 of a masked, weighted stack.
//
// NumPy twin: gpudiff.backend.reference.clipped_stack (same semantics, same arithmetic).
// Loaded by gpudiff.backend.kernels with cupy.RawModule (NVRTC) and compiled standalone
// by CI with `nvcc -arch=sm_90 -cubin`.  No headers are included, so the file compiles
// under NVRTC, under nvcc for the device, and under nvcc for the host (the per-pixel
// function is __host__ __device__ so the test suite can run it on a CPU).
//
// Layout: data[k * npix + p] (epoch k, pixel p; the pixel index is the fastest so that
// neighbouring threads read neighbouring addresses), bad likewise (uint8, nonzero =
// excluded), weights[k] (float32, >= 0; pass all ones for an unweighted stack).
//
// Semantics (afw Statistics.cc, StatisticsControl numSigmaClip / numIter):
//   valid      = !bad && isfinite(x)
//   pass 0     centre = median, half-width = nsigma * 0.741301109252802 * IQR, with
//              quartiles by linear interpolation (afw medianAndQuartiles)
//   pass i > 0 centre = clipped mean of pass i-1, half-width = nsigma * sqrt(clipped
//              variance of pass i-1) if the pixel has > 1 valid sample, else the IQR width
//   each pass re-clips the full valid sample; x survives if |x - centre| <= half-width
//   sums (float64, in epoch order): W = sum w, W2 = sum w^2, S1 = sum w d, S2 = sum w d^2,
//              d = x - centre;  mean = S1/W + centre,
//              var = (S2/W - (S1/W)^2) * W^2/(W^2 - W2)   (NaN unless W > 0 and W^2 > W2)
//   niter passes in total (afw: for (i = 0; i < numIter; ++i)).
// Floating-point contraction is disabled by hand (__dmul_rn/__dadd_rn) so that the device
// rounds exactly like the NumPy twin.

#define GD_IQ_TO_STDEV 0.741301109252802

namespace gd_clip {

__host__ __device__ inline double nan_d() {
    union { unsigned long long u; double d; } c;
    c.u = 0x7ff8000000000000ULL;
    return c.d;
}

__host__ __device__ inline float nan_f() {
    union { unsigned int u; float f; } c;
    c.u = 0x7fc00000u;
    return c.f;
}

// Multiply and add without fused multiply-add, on the device and on the host.
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

// afw medianAndQuartiles: s[0..n) sorted ascending.
__host__ __device__ inline double quantile_sorted(const float* s, int n, double frac) {
    if (n > 1) {
        const double idx = mul(frac, (double)(n - 1));
        const int q1 = (int)idx;
        const int q2 = q1 + 1;
        const double w1 = sub((double)q2, idx);
        const double w2 = sub(idx, (double)q1);
        return add(mul(w1, (double)s[q1]), mul(w2, (double)s[q2]));
    }
    if (n == 1) {
        return (double)s[0];
    }
    return nan_d();
}

// Finite test on the bits (no dependence on <cmath> overloads under NVRTC).
__host__ __device__ inline bool finite_f(float v) {
    union { float f; unsigned int u; } c;
    c.f = v;
    return (c.u & 0x7f800000u) != 0x7f800000u;
}

__host__ __device__ inline bool is_valid(float v, unsigned char b) {
    return b == 0 && finite_f(v);
}

// One output pixel.  `scratch` holds at least `nepoch` floats (the sorted valid samples).
// `used` (if write_used) receives the survivor flags of the final pass, same layout as
// `data`.
__host__ __device__ inline void clip_pixel(const float* __restrict__ data,
                                           const unsigned char* __restrict__ bad,
                                           const float* __restrict__ weights,
                                           int nepoch, long long npix, long long p,
                                           double nsigma, int niter, float* scratch,
                                           float* __restrict__ out_mean,
                                           float* __restrict__ out_var,
                                           int* __restrict__ out_n,
                                           unsigned char* __restrict__ used,
                                           int write_used) {
    // 1. gather the valid samples, insertion-sorted
    int n = 0;
    for (int k = 0; k < nepoch; ++k) {
        const long long off = (long long)k * npix + p;
        const float v = data[off];
        if (!is_valid(v, bad[off])) continue;
        int j = n;
        while (j > 0 && scratch[j - 1] > v) {
            scratch[j] = scratch[j - 1];
            --j;
        }
        scratch[j] = v;
        ++n;
    }
    if (n == 0) {
        out_mean[p] = nan_f();
        out_var[p] = nan_f();
        out_n[p] = 0;
        if (write_used) {
            for (int k = 0; k < nepoch; ++k) used[(long long)k * npix + p] = 0;
        }
        return;
    }

    // 2. pass-0 centre and width
    const double median = quantile_sorted(scratch, n, 0.50);
    const double q1 = quantile_sorted(scratch, n, 0.25);
    const double q3 = quantile_sorted(scratch, n, 0.75);
    const double iqr_width = mul(mul(nsigma, GD_IQ_TO_STDEV), sub(q3, q1));

    // 3. the clipping passes
    double center = median;
    double hwidth = iqr_width;
    double mean = nan_d();
    double var = nan_d();
    int nclip = 0;
    for (int it = 0; it < niter; ++it) {
        if (it > 0) {
            center = mean;
            hwidth = (n > 1) ? mul(nsigma, sqrt(var)) : iqr_width;
        }
        double sumw = 0.0, sumw2 = 0.0, sumx = 0.0, sumx2 = 0.0;
        nclip = 0;
        for (int k = 0; k < nepoch; ++k) {
            const long long off = (long long)k * npix + p;
            const float v = data[off];
            if (!is_valid(v, bad[off])) continue;
            const double d = sub((double)v, center);
            if (!(fabs(d) <= hwidth)) continue;  // NaN centre or width: nothing survives
            const double w = (double)weights[k];
            const double wd = mul(w, d);
            sumw = add(sumw, w);
            sumw2 = add(sumw2, mul(w, w));
            sumx = add(sumx, wd);
            sumx2 = add(sumx2, mul(wd, d));
            ++nclip;
        }
        if (sumw > 0.0) {
            const double mean_d = sumx / sumw;
            const double s2 = mul(sumw, sumw);
            const double denom = sub(s2, sumw2);
            if (denom > 0.0) {
                var = mul(sub(sumx2 / sumw, mul(mean_d, mean_d)), s2 / denom);
            } else {
                var = nan_d();
            }
            mean = add(mean_d, center);
        } else {
            mean = nan_d();
            var = nan_d();
        }
    }

    out_mean[p] = (float)mean;
    out_var[p] = (float)var;
    out_n[p] = nclip;

    // 4. survivor flags of the final pass
    if (write_used) {
        for (int k = 0; k < nepoch; ++k) {
            const long long off = (long long)k * npix + p;
            const float v = data[off];
            unsigned char u = 0;
            if (is_valid(v, bad[off])) {
                const double d = sub((double)v, center);
                u = (fabs(d) <= hwidth) ? 1 : 0;
            }
            used[off] = u;
        }
    }
}

}  // namespace gd_clip

// One thread per pixel; MAXN is the deepest stack the variant accepts (the launcher picks
// the smallest variant with MAXN >= nepoch).  A call with nepoch > MAXN is a launcher bug:
// it is answered with NaN and n_used = -1 rather than an out-of-bounds write.
#define GD_CLIPPED_STACK_VARIANT(MAXN)                                                      \
    extern "C" __global__ void clipped_stack_f32_n##MAXN(                                   \
        const float* __restrict__ data, const unsigned char* __restrict__ bad,              \
        const float* __restrict__ weights, int nepoch, long long npix, double nsigma,       \
        int niter, float* __restrict__ out_mean, float* __restrict__ out_var,               \
        int* __restrict__ out_n, unsigned char* __restrict__ used, int write_used) {        \
        const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;               \
        if (p >= npix) return;                                                              \
        if (nepoch > MAXN || nepoch < 0) {                                                  \
            out_mean[p] = gd_clip::nan_f();                                                 \
            out_var[p] = gd_clip::nan_f();                                                  \
            out_n[p] = -1;                                                                  \
            return;                                                                         \
        }                                                                                   \
        float scratch[MAXN];                                                                \
        gd_clip::clip_pixel(data, bad, weights, nepoch, npix, p, nsigma, niter, scratch,   \
                            out_mean, out_var, out_n, used, write_used);                    \
    }

GD_CLIPPED_STACK_VARIANT(32)
GD_CLIPPED_STACK_VARIANT(64)
GD_CLIPPED_STACK_VARIANT(128)
GD_CLIPPED_STACK_VARIANT(256)
