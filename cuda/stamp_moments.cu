// gpudiff: iterated moments of a batch of stamps, one thread block per source.
//
// NumPy twins: gpudiff.backend.kernels.adaptive_moments_twin / weighted_centroid_twin
// (the masked whole-batch iterations that gpudiff.ops.stats runs on the CPU).  Loaded by
// gpudiff.backend.kernels with cupy.RawModule (NVRTC) and compiled standalone by CI with
// `nvcc -arch=sm_90 -cubin`.  No headers are included.
//
// Layout: img[src * s * s + row * s + col], float64, masked pixels already zeroed; the
// pixel offsets from the central pixel are (col - s/2, row - s/2).  Every block iterates
// its own source to convergence or failure (a block-uniform decision, so the early exit
// costs no divergence) and writes its result once: one launch for the whole batch, no
// host synchronisation.  Block sums are float64 in a fixed tree order; the twin sums in
// NumPy's order, so the two agree to rounding (~1e-13), not bit for bit.
//
// adaptive_moments_f64 (the SdssShape fixed point W <- 2 Q, as the twin):
//   state (xc, yc, wxx, wyy, wxy) starts at (0, 0, w_init, w_init, 0), change = inf
//   per step: w = exp(-q/2) * I, q = (wyy dx^2 - 2 wxy dx dy + wxx dy^2) / det
//             raw sums S = sum w * [1, x, y, x^2, y^2, xy]
//             good = S0 > 0 and |x'|, |y'| <= 2 (x' = Sx / S0 ...)
//             w'xx = clip(2 (Sxx/S0 - x'^2), 0.04, s^2), likewise yy;
//             w'xy = clip(2 (Sxy/S0 - x' y'), -0.99 sqrt(w'xx w'yy), +...)
//             not good: the source stops (failed), its state frozen
//             else change = |dwxx| + |dwyy| + |dwxy|, state <- new, and the source stops
//             when change < tol (wxx + wyy)
//   ok = never failed and change < 10 tol (wxx + wyy)
//
// weighted_centroid_f64 (round Gaussian weight of sigma, exactly niter steps):
//   good = S0 > 0 and |x'|, |y'| <= max_shift; a failed source stops, frozen;
//   ok = never failed and the last step |dx| + |dy| < 1e-3.

#define GD_MOM_BLOCK 128

namespace gd_mom {

__device__ inline double clampd(double v, double lo, double hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

// Sum k values per thread over the block; every thread gets the totals in tot[0..k).
template <int K>
__device__ inline void block_sums(double (*red)[GD_MOM_BLOCK], const double* v, double* tot) {
    const int t = threadIdx.x;
    for (int j = 0; j < K; ++j) red[j][t] = v[j];
    __syncthreads();
    for (int h = GD_MOM_BLOCK / 2; h > 0; h >>= 1) {
        if (t < h) {
            for (int j = 0; j < K; ++j) red[j][t] = red[j][t] + red[j][t + h];
        }
        __syncthreads();
    }
    for (int j = 0; j < K; ++j) tot[j] = red[j][0];
    __syncthreads();  // red is reused by the next call
}

}  // namespace gd_mom

extern "C" __global__ void adaptive_moments_f64(const double* __restrict__ img, int n, int s,
                                                double w_init, int max_iter, double tol,
                                                double* __restrict__ out,
                                                unsigned char* __restrict__ ok_out) {
    __shared__ double red[6][GD_MOM_BLOCK];
    const int src = blockIdx.x;
    if (src >= n) return;
    const double* im = img + (size_t)src * (size_t)s * (size_t)s;
    const int npix = s * s;
    const int half = s / 2;
    const double lo = 0.04, hi = (double)npix;
    double xc = 0.0, yc = 0.0, wxx = w_init, wyy = w_init, wxy = 0.0;
    double change = __longlong_as_double(0x7ff0000000000000LL);  // +inf
    bool ok = true;
    for (int it = 0; it < max_iter; ++it) {
        const double det = wxx * wyy - wxy * wxy;
        double acc[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        for (int p = threadIdx.x; p < npix; p += GD_MOM_BLOCK) {
            const double x = (double)(p % s - half), y = (double)(p / s - half);
            const double dx = x - xc, dy = y - yc;
            const double q = (wyy * dx * dx - 2.0 * wxy * dx * dy + wxx * dy * dy) / det;
            const double w = exp(-0.5 * q) * im[p];
            acc[0] += w;
            acc[1] += w * x;
            acc[2] += w * y;
            acc[3] += w * x * x;
            acc[4] += w * y * y;
            acc[5] += w * x * y;
        }
        double S[6];
        gd_mom::block_sums<6>(red, acc, S);
        // every thread holds the same totals: the decisions below are block-uniform
        const bool pos = S[0] > 0.0;
        const double s0 = pos ? S[0] : 1.0;
        const double nx = S[1] / s0, ny = S[2] / s0;
        const double nxx = gd_mom::clampd(2.0 * (S[3] / s0 - nx * nx), lo, hi);
        const double nyy = gd_mom::clampd(2.0 * (S[4] / s0 - ny * ny), lo, hi);
        const double lim = 0.99 * sqrt(nxx * nyy);
        const double nxy = gd_mom::clampd(2.0 * (S[5] / s0 - nx * ny), -lim, lim);
        if (!(pos && fabs(nx) <= 2.0 && fabs(ny) <= 2.0)) {
            ok = false;
            break;
        }
        change = fabs(nxx - wxx) + fabs(nyy - wyy) + fabs(nxy - wxy);
        xc = nx;
        yc = ny;
        wxx = nxx;
        wyy = nyy;
        wxy = nxy;
        if (!(change >= tol * (wxx + wyy))) break;
    }
    if (threadIdx.x == 0) {
        double* o = out + (size_t)src * 5;
        o[0] = xc;
        o[1] = yc;
        o[2] = wxx;
        o[3] = wyy;
        o[4] = wxy;
        ok_out[src] = (ok && change < tol * (wxx + wyy) * 10.0) ? 1 : 0;
    }
}

extern "C" __global__ void weighted_centroid_f64(const double* __restrict__ img, int n, int s,
                                                 const double* __restrict__ x0,
                                                 const double* __restrict__ y0, double sigma,
                                                 int niter, double max_shift,
                                                 double* __restrict__ out,
                                                 unsigned char* __restrict__ ok_out) {
    __shared__ double red[3][GD_MOM_BLOCK];
    const int src = blockIdx.x;
    if (src >= n) return;
    const double* im = img + (size_t)src * (size_t)s * (size_t)s;
    const int npix = s * s;
    const int half = s / 2;
    const double k = -0.5 / (sigma * sigma);
    double x = x0[src], y = y0[src], step = 0.0;
    bool ok = true;
    for (int it = 0; it < niter; ++it) {
        double acc[3] = {0.0, 0.0, 0.0};
        for (int p = threadIdx.x; p < npix; p += GD_MOM_BLOCK) {
            const double px = (double)(p % s - half), py = (double)(p / s - half);
            const double dx = px - x, dy = py - y;
            const double w = exp(dx * dx * k) * exp(dy * dy * k) * im[p];
            acc[0] += w;
            acc[1] += w * px;
            acc[2] += w * py;
        }
        double S[3];
        gd_mom::block_sums<3>(red, acc, S);
        const double nx = S[1] / S[0], ny = S[2] / S[0];
        if (!(S[0] > 0.0 && fabs(nx) <= max_shift && fabs(ny) <= max_shift)) {
            ok = false;
            step = 0.0;
            break;
        }
        step = fabs(nx - x) + fabs(ny - y);
        x = nx;
        y = ny;
    }
    if (threadIdx.x == 0) {
        out[(size_t)src * 2] = x;
        out[(size_t)src * 2 + 1] = y;
        ok_out[src] = (ok && step < 1e-3) ? 1 : 0;
    }
}
