// gpudiff: mask-plane operations.
//
// NumPy twin: gpudiff.backend.reference.mask_dilate_or.
// No headers: compiles under NVRTC (cupy.RawModule), nvcc device and nvcc host.
//
// mask_dilate_or_i32: bitwise OR of mask bits under a footprint, afw's rule for the mask
// of a convolved MaskedImage (correlation convention):
//     out[r, c] = OR over footprint pixels (i, j) of mask[r - ctrY + i, c - ctrX + j]
// with ctrY = (kh-1)/2, ctrX = (kw-1)/2; pixels outside the image contribute 0.  The host
// passes the footprint as a list of offsets (dy[t], dx[t]) = (i - ctrY, j - ctrX) of its
// nonzero pixels.

namespace gd_mask {

__host__ __device__ inline int dilate_pixel(const int* __restrict__ mask, int height, int width,
                                            const int* __restrict__ dy,
                                            const int* __restrict__ dx, int noff, int r, int c) {
    int acc = 0;
    for (int t = 0; t < noff; ++t) {
        const int rr = r + dy[t];
        const int cc = c + dx[t];
        if (rr >= 0 && rr < height && cc >= 0 && cc < width) {
            acc |= mask[(long long)rr * width + cc];
        }
    }
    return acc;
}

}  // namespace gd_mask

// 2-d launch: x over columns, y over rows.
extern "C" __global__ void mask_dilate_or_i32(const int* __restrict__ mask, int height, int width,
                                              const int* __restrict__ dy,
                                              const int* __restrict__ dx, int noff,
                                              int* __restrict__ out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int r = blockIdx.y * blockDim.y + threadIdx.y;
    if (r >= height || c >= width) return;
    out[(long long)r * width + c] = gd_mask::dilate_pixel(mask, height, width, dy, dx, noff, r, c);
}
