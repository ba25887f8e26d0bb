// cuda/cudnn_attention.h: cuDNN's fused flash attention (the trainer's -fa 2), on llm.c's qkv layout; built with USE_CUDNN.
#pragma once
#include <stddef.h>

// Layouts, as the rest of the trainer: qkv (B, T, 3C) bf16 with q, k, v each (NH, HS) per token;
// out, dout (B, T, C) bf16; stats (B, NH, T) fp32, the natural-log logsumexp of each query row's
// scaled causal scores (the same quantity and layout as flash_attention.cuh's lse); dqkv (B, T, 3C)
// bf16, overwritten. The scale is 1/sqrt(HS). Everything runs on the default stream.
//
// The cuDNN graphs are built once per shape (B, T, NH, HS) and direction, on first use, and
// cached: building one can take a second when cuDNN compiles its kernel, so callers should keep to
// a few shapes.

// How the graphs see each buffer: a (B, NH, T, HS) logical view (stats: (B, NH, T, 1)) with
// element strides, starting `offset` elements into the buffer (k and v sit C and 2C into qkv).
typedef enum { CUDNN_ATT_Q, CUDNN_ATT_K, CUDNN_ATT_V, CUDNN_ATT_OUT, CUDNN_ATT_STATS } CudnnAttTensor;
typedef struct {
    long long dim[4], stride[4], offset;
} CudnnAttLayout;
static inline CudnnAttLayout cudnn_attention_layout(CudnnAttTensor which, int B, int T, int NH, int HS) {
    const long long C = (long long)NH * HS;
    CudnnAttLayout l = {{B, NH, T, HS}, {0, 0, 0, 0}, 0};
    switch (which) {
    case CUDNN_ATT_Q:
    case CUDNN_ATT_K:
    case CUDNN_ATT_V:  // (B, T, 3, NH, HS): the part's C columns of each token's 3C
        l.stride[0] = (long long)T * 3 * C; l.stride[1] = HS; l.stride[2] = 3 * C; l.stride[3] = 1;
        l.offset = (long long)(which - CUDNN_ATT_Q) * C;
        break;
    case CUDNN_ATT_OUT:  // (B, T, NH, HS)
        l.stride[0] = (long long)T * C; l.stride[1] = HS; l.stride[2] = C; l.stride[3] = 1;
        break;
    case CUDNN_ATT_STATS:  // (B, NH, T), one value per query row
        l.dim[3] = 1;
        l.stride[0] = (long long)NH * T; l.stride[1] = T; l.stride[2] = 1; l.stride[3] = 1;
        break;
    }
    return l;
}

// Builds the forward and backward graphs of this shape and sizes the workspace. Returns 1 when
// cuDNN can run them; otherwise 0, with cuDNN's reason in why (why_len bytes, may be NULL).
int cudnn_attention_prepare(int B, int T, int NH, int HS, char *why, size_t why_len);

// 1 when the backward of the prepared shapes is cuDNN's deterministic algorithm (bit-identical
// runs); 0 when this cuDNN has none for them and the backward adds in an unspecified order.
int cudnn_attention_deterministic(void);

// The graphs of this shape checked without a GPU, for one of compute capability sm (90: H100;
// tests/test_cudnn_graph.cpp): the frontend's checks (tensor dims, strides and types, the SDPA
// nodes' rules for that GPU) and, given device_json (cuDNN's serialized device properties, as
// DeviceProperties::serialize writes them), cuDNN's own: the lowering to its backend graph, its
// heuristics, and that one of its engines supports each graph on that device. cuDNN loads
// libcuda.so.1 for that last step (the toolkit's stub library is enough); building the plans
// (loading kernels) is left to a GPU. Returns 1 when it all passes, else 0 with the step and
// cuDNN's message in why. *deterministic (may be NULL): whether the backward that passed is the
// deterministic algorithm (else why says why not).
int cudnn_attention_check(int B, int T, int NH, int HS, int sm, const char *device_json, int *deterministic, char *why, size_t why_len);

void cudnn_attention_forward(void *out, float *stats, const void *qkv, int B, int T, int NH, int HS);
void cudnn_attention_backward(void *dqkv, const void *dout, const void *qkv, const void *out, const float *stats, int B, int T, int NH,
                              int HS);

// Bytes of device memory the workspace holds (for the trainer's memory report).
size_t cudnn_attention_workspace_bytes(void);

// Frees the graphs, the workspace and the cuDNN handle.
void cudnn_attention_destroy(void);
