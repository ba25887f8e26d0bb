// cuda/encoder.cuh: token + position embedding forward, and its deterministic backward (tokens bucketed on the host, each wte row summed in position order).
#pragma once
#include "common.cuh"

// out[b, t, :] = wte[inp[b, t], :] + wpe[t, :]
__global__ void encoder_forward_kernel(floatX *out, const int *inp, const floatX *wte, const floatX *wpe, int B, int T, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, C8 = (size_t)C / 8;
    if (i >= (size_t)B * T * C8) return;
    size_t bt = i / C8;
    int c = (int)(i % C8) * 8, t = (int)(bt % T);
    x128 we = load128(wte + (size_t)inp[bt] * C + c), pe = load128(wpe + (size_t)t * C + c), o;
    for (int k = 0; k < 8; k++) o[k] = (floatX)((float)we[k] + (float)pe[k]);
    store128(out + bt * C + c, o);
}

static void encoder_forward(floatX *out, const int *inp, const floatX *wte, const floatX *wpe, int B, int T, int C) {
    size_t n = (size_t)B * T * C / 8;
    encoder_forward_kernel<<<ceil_div_i((long)n, 256), 256>>>(out, inp, wte, wpe, B, T, C);
    cudaCheckLaunch();
}

// The backward's bucketing, done on the host where the tokens are: the distinct tokens of the
// batch, and for each the positions (b*T + t) where it occurs, in increasing order. Layout of
// `buf` (ints): [0] = U (distinct tokens), then tokens[U], offsets[U + 1], positions[B*T].
// count has room for the vocabulary (zeroed on entry and on return).
static int encoder_buckets_build(int *buf, int *count, const int *inp, int BT, int V) {
    for (int i = 0; i < BT; i++) count[inp[i]]++;
    int U = 0;
    for (int v = 0; v < V; v++) if (count[v]) U++;
    int *tokens = buf + 1, *offsets = tokens + U, *positions = offsets + U + 1;
    buf[0] = U;
    int u = 0, off = 0;
    for (int v = 0; v < V; v++) {
        if (!count[v]) continue;
        tokens[u] = v;
        offsets[u] = off;
        off += count[v];
        count[v] = offsets[u];  // becomes the fill cursor
        u++;
    }
    offsets[U] = off;
    for (int i = 0; i < BT; i++) positions[count[inp[i]]++] = i;  // stable: positions ascend
    for (int i = 0; i < BT; i++) count[inp[i]] = 0;
    return 1 + U + U + 1 + BT;  // ints used
}

// one block per distinct token: dwte[token] += Σ over its positions (in order) of dout[pos]
__global__ void encoder_backward_wte_kernel(floatX *dwte, const floatX *dout, const int *buckets, int C) {
    int U = buckets[0];
    int u = blockIdx.x;
    if (u >= U) return;
    const int *tokens = buckets + 1, *offsets = tokens + U, *positions = offsets + U + 1;
    int tok = tokens[u], p0 = offsets[u], p1 = offsets[u + 1];
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int p = p0; p < p1; p++) {
            x128 d = load128(dout + (size_t)positions[p] * C + c);
            for (int k = 0; k < 8; k++) acc[k] += (float)d[k];
        }
        x128 w = load128(dwte + (size_t)tok * C + c);
        for (int k = 0; k < 8; k++) w[k] = (floatX)((float)w[k] + acc[k]);
        store128(dwte + (size_t)tok * C + c, w);
    }
}

// dwpe[t, c] += Σ_b dout[b, t, c], b in order
__global__ void encoder_backward_wpe_kernel(floatX *dwpe, const floatX *dout, int B, int T, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, C8 = (size_t)C / 8;
    if (i >= (size_t)T * C8) return;
    int t = (int)(i / C8), c = (int)(i % C8) * 8;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int b = 0; b < B; b++) {
        x128 d = load128(dout + ((size_t)b * T + t) * C + c);
        for (int k = 0; k < 8; k++) acc[k] += (float)d[k];
    }
    x128 w = load128(dwpe + (size_t)t * C + c);
    for (int k = 0; k < 8; k++) w[k] = (floatX)((float)w[k] + acc[k]);
    store128(dwpe + (size_t)t * C + c, w);
}

// d_buckets: the device copy of encoder_buckets_build's buffer; U its number of distinct tokens
static void encoder_backward(floatX *dwte, floatX *dwpe, const floatX *dout, const int *d_buckets, int U, int B, int T, int C) {
    int threads = C / 8 < 128 ? ((C / 8 + 31) / 32) * 32 : 128;
    encoder_backward_wte_kernel<<<U, threads>>>(dwte, dout, d_buckets, C);
    cudaCheckLaunch();
    size_t n = (size_t)T * C / 8;
    encoder_backward_wpe_kernel<<<ceil_div_i((long)n, 256), 256>>>(dwpe, dout, B, T, C);
    cudaCheckLaunch();
}
