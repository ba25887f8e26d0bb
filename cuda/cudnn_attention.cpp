// cuda/cudnn_attention.cpp: cuDNN's fused flash attention through the cuDNN frontend's graph API
// (header-only C++: requirements-cudnn.txt and the README's "cuDNN attention" say where it comes
// from), behind cudnn_attention.h.
//
// A separate translation unit: the frontend's headers take a minute to compile, so they are built
// once into an object (Makefile: USE_CUDNN) instead of with every change to train_gpt2.cu.
//
// The graphs read q, k and v straight out of llm.c's (B, T, 3, NH, HS) qkv and write dq, dk, dv
// back into it through strides, so no permute kernel runs on either side, and the output is
// (B, T, NH, HS) = (B, T, C), what the projection after attention reads.
#include "cuda/cudnn_attention.h"

#include <cuda_runtime.h>
#include <cudnn.h>
#include <cudnn_frontend.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <exception>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace fe = cudnn_frontend;

namespace {

[[noreturn]] void die(const char *what, const std::string &detail, const char *file, int line) {
    fprintf(stderr, "error: cuDNN attention: %s: %s (at %s:%d)\n", what, detail.c_str(), file, line);
    exit(EXIT_FAILURE);
}
void cudnn_check(cudnnStatus_t s, const char *file, int line) {
    if (s != CUDNN_STATUS_SUCCESS) die("cuDNN call failed", cudnnGetErrorString(s), file, line);
}
void cuda_check(cudaError_t e, const char *file, int line) {
    if (e != cudaSuccess) die("CUDA call failed", cudaGetErrorString(e), file, line);
}
#define cudnnCheck(s) cudnn_check((s), __FILE__, __LINE__)
#define cudaCheckCu(e) cuda_check((e), __FILE__, __LINE__)

// the tensors' ids in the variant pack handed to execute()
enum : int64_t { UID_Q = 1, UID_K, UID_V, UID_O, UID_STATS, UID_DO, UID_DQ, UID_DK, UID_DV };

typedef std::tuple<int, int, int, int> Shape;  // B, T, NH, HS
typedef std::shared_ptr<fe::graph::Graph> GraphPtr;
typedef std::shared_ptr<fe::graph::Tensor_attributes> TensorPtr;

struct Graphs {
    GraphPtr fwd, bwd;
};

struct State {
    cudnnHandle_t handle = nullptr;
    std::map<Shape, Graphs> graphs;
    void *workspace = nullptr;
    size_t workspace_bytes = 0;
    bool deterministic = true;  // every backward graph built so far is the deterministic algorithm
};
State g;

// one tensor of the graph laid out as cudnn_attention_layout says (stats also fp32)
void set_layout(const TensorPtr &t, CudnnAttTensor which, int B, int T, int NH, int HS) {
    CudnnAttLayout l = cudnn_attention_layout(which, B, T, NH, HS);
    t->set_dim({l.dim[0], l.dim[1], l.dim[2], l.dim[3]}).set_stride({l.stride[0], l.stride[1], l.stride[2], l.stride[3]});
    if (which == CUDNN_ATT_STATS) t->set_data_type(fe::DataType_t::FLOAT);
}

// a graph input with its id in the variant pack, laid out as `which`
TensorPtr input(const GraphPtr &gr, const char *name, int64_t uid, CudnnAttTensor which, int B, int T, int NH, int HS) {
    TensorPtr t = gr->tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid));
    set_layout(t, which, B, T, NH, HS);
    return t;
}

// What a graph is built for: the GPU in use (sm 0: through the handle, up to a plan that runs), or
// a described GPU without one (cudnn_attention_check): sm alone, the frontend's checks; with
// props, also cuDNN's lowering, heuristics and engine support for that device.
struct Target {
    int sm = 0;
    std::shared_ptr<fe::DeviceProperties> props;
};

GraphPtr new_graph(const Target &tg) {
    auto gr = std::make_shared<fe::graph::Graph>();
    if (tg.sm > 0) gr->set_sm_version(tg.sm);
    if (tg.props) gr->set_device_properties(tg.props);
    gr->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    return gr;
}

// validate, lower to cuDNN's backend, pick engines by heuristics, check one supports the graph,
// build its plan; as far as the target allows (see Target). Returns "" on success, else the step
// and cuDNN's message.
std::string finalize(const GraphPtr &gr, const Target &tg) {
    const bool deviceless = tg.sm > 0;
    fe::error_t e = gr->validate();
    if (e.is_bad()) return "validate: " + e.get_message();
    if (deviceless && !tg.props) return "";
    if ((e = gr->build_operation_graph(deviceless ? nullptr : g.handle)).is_bad()) return "build_operation_graph: " + e.get_message();
    if ((e = gr->create_execution_plans({fe::HeurMode_t::A})).is_bad()) return "create_execution_plans: " + e.get_message();
    if ((e = deviceless ? gr->check_support() : gr->check_support(g.handle)).is_bad()) return "check_support: " + e.get_message();
    if (deviceless) return "";  // a plan's build loads its kernels: that needs the GPU
    if ((e = gr->build_plans(g.handle)).is_bad()) return "build_plans: " + e.get_message();
    return "";
}

GraphPtr forward_graph(int B, int T, int NH, int HS, const Target &tg, std::string *err) {
    GraphPtr gr = new_graph(tg);
    TensorPtr q = input(gr, "q", UID_Q, CUDNN_ATT_Q, B, T, NH, HS), k = input(gr, "k", UID_K, CUDNN_ATT_K, B, T, NH, HS),
              v = input(gr, "v", UID_V, CUDNN_ATT_V, B, T, NH, HS);
    auto opts = fe::graph::SDPA_attributes()
                    .set_name("attention")
                    .set_generate_stats(true)  // the backward needs the logsumexp
                    .set_causal_mask(true)     // query t sees keys 0..t
                    .set_attn_scale(1.0f / sqrtf((float)HS));
    auto outs = gr->sdpa(q, k, v, opts);
    TensorPtr o = outs[0], stats = outs[1];
    o->set_output(true).set_uid(UID_O);
    set_layout(o, CUDNN_ATT_OUT, B, T, NH, HS);
    stats->set_output(true).set_uid(UID_STATS);
    set_layout(stats, CUDNN_ATT_STATS, B, T, NH, HS);
    *err = finalize(gr, tg);
    return err->empty() ? gr : nullptr;
}

GraphPtr backward_graph(int B, int T, int NH, int HS, bool deterministic, const Target &tg, std::string *err) {
    GraphPtr gr = new_graph(tg);
    TensorPtr q = input(gr, "q", UID_Q, CUDNN_ATT_Q, B, T, NH, HS), k = input(gr, "k", UID_K, CUDNN_ATT_K, B, T, NH, HS),
              v = input(gr, "v", UID_V, CUDNN_ATT_V, B, T, NH, HS);
    TensorPtr o = input(gr, "o", UID_O, CUDNN_ATT_OUT, B, T, NH, HS), dout = input(gr, "dout", UID_DO, CUDNN_ATT_OUT, B, T, NH, HS),
              stats = input(gr, "stats", UID_STATS, CUDNN_ATT_STATS, B, T, NH, HS);
    auto opts = fe::graph::SDPA_backward_attributes()
                    .set_name("attention_backward")
                    .set_causal_mask(true)
                    .set_attn_scale(1.0f / sqrtf((float)HS))
                    .set_deterministic_algorithm(deterministic);
    auto grads = gr->sdpa_backward(q, k, v, o, dout, stats, opts);
    const int64_t uids[3] = {UID_DQ, UID_DK, UID_DV};
    const CudnnAttTensor parts[3] = {CUDNN_ATT_Q, CUDNN_ATT_K, CUDNN_ATT_V};  // dqkv is laid out as qkv
    for (int i = 0; i < 3; i++) {
        grads[i]->set_output(true).set_uid(uids[i]);
        set_layout(grads[i], parts[i], B, T, NH, HS);
    }
    *err = finalize(gr, tg);
    return err->empty() ? gr : nullptr;
}

size_t workspace_of(const GraphPtr &gr) {
    int64_t bytes = 0;
    fe::error_t e = gr->get_workspace_size(bytes);
    if (e.is_bad()) die("get_workspace_size", e.get_message(), __FILE__, __LINE__);
    return (size_t)bytes;
}

// Grows the one workspace every graph shares (they run one at a time on one stream).
void reserve_workspace(size_t bytes) {
    if (bytes <= g.workspace_bytes) return;
    cudaCheckCu(cudaDeviceSynchronize());  // a running graph may still use the old one
    if (g.workspace) cudaCheckCu(cudaFree(g.workspace));
    g.workspace = nullptr;
    cudaError_t e = cudaMalloc(&g.workspace, bytes);
    if (e != cudaSuccess) {
        fprintf(stderr,
                "error: out of GPU memory allocating the cuDNN attention workspace (%.1f MiB): %s; "
                "use a smaller -b, or -fa 1 (our flash kernel, no workspace)\n",
                bytes / 1048576.0, cudaGetErrorString(e));
        exit(EXIT_FAILURE);
    }
    g.workspace_bytes = bytes;
}

// The forward (backward = false) or backward graph of a shape for a target; the backward is
// cuDNN's deterministic algorithm where it has one, else (*det_why says why) the fast one.
// "" when built, else why not.
std::string build_graph(GraphPtr *gr, bool backward, int B, int T, int NH, int HS, const Target &tg, std::string *det_why) {
    std::string err;
    try {
        if (!backward) {
            *gr = forward_graph(B, T, NH, HS, tg, &err);
        } else {
            *gr = backward_graph(B, T, NH, HS, true, tg, &err);
            if (!*gr) {  // older cuDNN, or no deterministic engine for this shape
                *det_why = err;
                *gr = backward_graph(B, T, NH, HS, false, tg, &err);
            }
        }
    } catch (const std::exception &ex) {  // the frontend reports some failures by throwing
        err = std::string("exception: ") + ex.what();
    }
    return *gr ? "" : (backward ? "backward: " : "forward: ") + err;
}

// Builds (once) the forward or the backward graph of this shape; "" when ready, else why not.
// Each is built on first use: a forward-only shape (sampling: T = 1 has no backward in cuDNN)
// never needs its backward.
std::string ensure(bool backward, int B, int T, int NH, int HS) {
    Graphs &gs = g.graphs[Shape(B, T, NH, HS)];
    GraphPtr &gr = backward ? gs.bwd : gs.fwd;
    if (gr) return "";
    if (!g.handle) cudnnCheck(cudnnCreate(&g.handle));
    std::string det_why, err = build_graph(&gr, backward, B, T, NH, HS, Target(), &det_why);
    if (!err.empty()) return err;
    if (!det_why.empty()) {
        fprintf(stderr,
                "note: cuDNN attention: no deterministic backward for B=%d T=%d NH=%d HS=%d (%s); "
                "runs may differ in the last bits (-fa 1 is bit-identical)\n",
                B, T, NH, HS, det_why.c_str());
        g.deterministic = false;
    }
    reserve_workspace(workspace_of(gr));
    return "";
}

const GraphPtr &graph_for(bool backward, int B, int T, int NH, int HS) {
    std::string err = ensure(backward, B, T, NH, HS);
    if (!err.empty()) {
        char shape[96];
        snprintf(shape, sizeof(shape), "B=%d T=%d NH=%d HS=%d", B, T, NH, HS);
        die(shape, err + " (use -fa 1: our flash kernel)", __FILE__, __LINE__);
    }
    const Graphs &gs = g.graphs[Shape(B, T, NH, HS)];
    return backward ? gs.bwd : gs.fwd;
}

void execute(const GraphPtr &gr, std::unordered_map<int64_t, void *> &pack, const char *what) {
    fe::error_t e = gr->execute(g.handle, pack, g.workspace);
    if (e.is_bad()) die(what, e.get_message(), __FILE__, __LINE__);
}

// where a view starts in its bf16 buffer
void *at(const void *buf, CudnnAttTensor which, int B, int T, int NH, int HS) {
    return (char *)buf + cudnn_attention_layout(which, B, T, NH, HS).offset * 2;
}

}  // namespace

int cudnn_attention_prepare(int B, int T, int NH, int HS, char *why, size_t why_len) {
    std::string err = ensure(false, B, T, NH, HS);
    if (err.empty()) err = ensure(true, B, T, NH, HS);
    if (why && why_len) snprintf(why, why_len, "%s", err.c_str());
    return err.empty();
}

int cudnn_attention_deterministic(void) { return g.deterministic; }

int cudnn_attention_check(int B, int T, int NH, int HS, int sm, const char *device_json, int *deterministic, char *why, size_t why_len) {
    Target tg;
    tg.sm = sm;
    std::string err, det_why;
    if (sm <= 0) err = "sm must be a compute capability such as 90";
    else if (device_json) {
        tg.props = std::make_shared<fe::DeviceProperties>();
        std::vector<uint8_t> bytes(device_json, device_json + strlen(device_json));
        fe::error_t e = tg.props->deserialize(bytes);
        if (e.is_bad()) err = "device properties: " + e.get_message();
    }
    GraphPtr fwd, bwd;
    if (err.empty()) err = build_graph(&fwd, false, B, T, NH, HS, tg, &det_why);
    if (err.empty()) err = build_graph(&bwd, true, B, T, NH, HS, tg, &det_why);
    if (deterministic) *deterministic = err.empty() && det_why.empty();
    if (why && why_len) snprintf(why, why_len, "%s", err.empty() ? det_why.c_str() : err.c_str());
    return err.empty();
}

void cudnn_attention_forward(void *out, float *stats, const void *qkv, int B, int T, int NH, int HS) {
    const GraphPtr &gr = graph_for(false, B, T, NH, HS);
    std::unordered_map<int64_t, void *> pack = {
        {UID_Q, at(qkv, CUDNN_ATT_Q, B, T, NH, HS)},
        {UID_K, at(qkv, CUDNN_ATT_K, B, T, NH, HS)},
        {UID_V, at(qkv, CUDNN_ATT_V, B, T, NH, HS)},
        {UID_O, out},
        {UID_STATS, stats},
    };
    execute(gr, pack, "forward");
}

void cudnn_attention_backward(void *dqkv, const void *dout, const void *qkv, const void *out, const float *stats, int B, int T, int NH,
                              int HS) {
    const GraphPtr &gr = graph_for(true, B, T, NH, HS);
    std::unordered_map<int64_t, void *> pack = {
        {UID_Q, at(qkv, CUDNN_ATT_Q, B, T, NH, HS)},
        {UID_K, at(qkv, CUDNN_ATT_K, B, T, NH, HS)},
        {UID_V, at(qkv, CUDNN_ATT_V, B, T, NH, HS)},
        {UID_O, const_cast<void *>(out)},
        {UID_DO, const_cast<void *>(dout)},
        {UID_STATS, const_cast<float *>(stats)},
        {UID_DQ, at(dqkv, CUDNN_ATT_Q, B, T, NH, HS)},
        {UID_DK, at(dqkv, CUDNN_ATT_K, B, T, NH, HS)},
        {UID_DV, at(dqkv, CUDNN_ATT_V, B, T, NH, HS)},
    };
    execute(gr, pack, "backward");
}

size_t cudnn_attention_workspace_bytes(void) { return g.workspace_bytes; }

void cudnn_attention_destroy(void) {
    g.graphs.clear();
    if (g.workspace) cudaCheckCu(cudaFree(g.workspace));
    g.workspace = nullptr;
    g.workspace_bytes = 0;
    if (g.handle) cudnnCheck(cudnnDestroy(g.handle));
    g.handle = nullptr;
    g.deterministic = true;
}
