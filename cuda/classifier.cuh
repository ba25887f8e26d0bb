// cuda/classifier.cuh: fused softmax + cross-entropy over the padded vocabulary (fp32 loss per row), writing dlogits in place of the logits; no probability buffer.
#pragma once
#include "common.cuh"

// One block per row of logits (Vp wide, the first V real). losses[row] = logsumexp - logit[target]
// in fp32. With dloss != 0 the row is overwritten with dloss * (softmax - onehot) on the real
// columns and 0 on the padded ones.
__global__ void __launch_bounds__(1024) fused_classifier_kernel(floatX *logits, float *losses, const int *targets, int V, int Vp, float dloss) {
    __shared__ float sh_m[32], sh_s[32];
    size_t row = blockIdx.x;
    floatX *l = logits + row * Vp;
    float m = -FLT_MAX, s = 0.0f;
    for (int c = threadIdx.x * 8; c < Vp; c += blockDim.x * 8) {
        x128 x = load128(l + c);
        for (int k = 0; k < 8 && c + k < V; k++) {
            float v = (float)x[k];
            if (v > m) { s = s * __expf(m - v) + 1.0f; m = v; }
            else s += __expf(v - m);
        }
    }
    warp_softmax_reduce(m, s);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    if (lane == 0) { sh_m[warp] = m; sh_s[warp] = s; }
    __syncthreads();
    m = lane < nw ? sh_m[lane] : -FLT_MAX;
    s = lane < nw ? sh_s[lane] : 0.0f;
    warp_softmax_reduce(m, s);  // every warp now holds the row's (max, sum)
    int target = targets[row];
    if (threadIdx.x == 0) losses[row] = logf(s) + m - (float)l[target];
    if (dloss == 0.0f) return;
    __syncthreads();  // thread 0 has read l[target] before anyone overwrites it
    float inv = 1.0f / s;
    for (int c = threadIdx.x * 8; c < Vp; c += blockDim.x * 8) {
        x128 x = load128(l + c), o;
        for (int k = 0; k < 8; k++) {
            int i = c + k;
            float p = i < V ? __expf((float)x[k] - m) * inv : 0.0f;
            o[k] = (floatX)(i < V ? dloss * (p - (i == target ? 1.0f : 0.0f)) : 0.0f);
        }
        store128(l + c, o);
    }
}

static void fused_classifier(floatX *logits, float *losses, const int *targets, int N, int V, int Vp, float dloss) {
    int threads = Vp / 8 >= 1024 ? 1024 : ((Vp / 8 + 31) / 32) * 32;
    fused_classifier_kernel<<<N, threads>>>(logits, losses, targets, V, Vp, dloss);
    cudaCheckLaunch();
}
