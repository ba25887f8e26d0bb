// train_gpt2.cu: GPT-2 training on one NVIDIA GPU in bf16 mixed precision (fp32 master weights,
// AdamW moments, LayerNorm statistics, loss and gradient norm): the same model, files, flags and
// logs as the CPU trainer train_gpt2.c, with cuBLASLt matmuls and fused kernels from cuda/.
// Every linear layer goes through linear_forward / linear_backward: dense on cuBLASLt, BTT,
// Monarch and BTT-MoE through structured/structured.cuh (the cuBLAS baseline of issue 5).
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
// checkpoints in the background by default (-na): the host thread mostly waits for the GPU
#define CKPT_ASYNC_DEFAULT 1
#include "common/args.h"
#include "common/checkpoint.h"
#include "common/ckpt_writer.h"
#include "common/config.h"
#include "common/dataloader.h"
#include "common/gpt2.h"
#include "common/logger.h"
#include "common/rng.h"
#include "common/sampler.h"
#include "common/schedule.h"
#include "common/step_profile.h"
#include "common/tokenizer.h"
#include "common/utils.h"
#include <cuda_profiler_api.h>
#include "cuda/common.cuh"
#include "cuda/adamw.cuh"
#include "cuda/attention.cuh"
#include "cuda/classifier.cuh"
#include "cuda/encoder.cuh"
#include "cuda/global_norm.cuh"
#include "cuda/layernorm.cuh"
#include "cuda/matmul.cuh"
#include "cuda/reduce.cuh"
#include "cuda/flash_attention.cuh"
#include "cuda/multigpu.cuh"
#include "cuda/gpu_monitor.h"
#ifdef USE_CUDNN
#include "cuda/cudnn_attention.h"
#endif
#include "structured/structured.cuh"

// ----------------------------------------------------------------------------------------------
// The model

// Activations, each buffer holding all layers ([L, B, T, ...]) unless shared by recompute.
typedef struct {
    floatX *encoded;                   // (B, T, C)
    floatX *ln1;                       // (L, B, T, C); (B, T, C) shared with -r 2
    float *ln1_mean, *ln1_rstd;        // (L, B, T)
    floatX *qkv;                       // (L, B, T, 3C) rows q | k | v
    floatX *att;                       // (L, B, NH, T, T) softmax probabilities (cuBLAS attention only)
    floatX *atty;                      // (L, B, T, C) attention output
    floatX *res2;                      // (L, B, T, C) residual after attention
    floatX *ln2;                       // like ln1
    float *ln2_mean, *ln2_rstd;
    floatX *fch;                       // (L, B, T, 4C) fc output before the GELU
    floatX *fch_gelu;                  // (L, B, T, 4C); (B, T, 4C) shared with -r >= 1
    floatX *res3;                      // (L, B, T, C) the blocks' outputs
    floatX *lnf;                       // (B, T, C)
    float *lnf_mean, *lnf_rstd;
    floatX *logits;                    // (B, T, Vp); becomes dlogits in place
    float *losses;                     // (B, T) fp32
} Acts;

// -at 1: time each structured layer's kernels at startup and run each layer the fastest
// (structured/tune.cuh; st_autotune below)
static int g_st_tune = 0;
static int g_st_tune_skip = 0;  // -ax: the choices' slots (tune.cuh) -at 1 leaves out, as a mask
static const char *g_st_tune_skip_list = "";  // and as given, for messages
static const char *const ST_TUNE_OOM_NOTE = "-at 1 holds the buffers of every choice while it times them; without -at the choice of -sk and -sm needs less";

// What a structured linear layer keeps between its forward and backward.
typedef struct {
    floatX *inter;        // btt: z (N, gamma·phi·rho); monarch: u (N, nb·q); with -sk 4 transposed (gpu_plan.h)
    MoEGPUState moe;      // btt_moe
    int as_dense;         // BTT or Monarch run as dense GEMMs on the materialized weight (-sm 1, or -sm 2's model)
    int sk, sk_bwd;       // else its forward's and its backward's kernels as -sk 0..5; -at 1 chooses all three per layer
} LinearState;

// A layer's kernels as one byte (structured/tune.cuh: -sk 0..3, ST_K_DENSE, ST_K_ZT, ST_K_SETS,
// ST_K_MMA, a forward and backward pair, or ST_K_SETS_FUSED + -sk), and back. Grouping by set is
// BTT-MoE's use_sets with any -sk but 4 (moe_sets_now): its sk and sk_bwd say plans or which fused
// kernels each way.
static int lin_kernels(const LinearState *ls) {
    if (ls->as_dense) return ST_K_DENSE;
    if (ls->moe.use_sets && ls->sk != 4 && ls->sk_bwd != 4) return st_kernel_set_byte(ls->sk, ls->sk_bwd);
    return st_kernel_of_sk(ls->sk, ls->sk_bwd);
}
static void lin_set_kernels(LinearState *ls, int k) {
    ls->as_dense = k == ST_K_DENSE;
    ls->moe.use_sets = st_kernel_by_set(k);
    ls->sk = st_kernel_sk(k, 0);
    ls->sk_bwd = st_kernel_sk(k, 1);
}

typedef struct {
    GPT2Layout layout;
    GPT2Config config;
    char *config_text;                 // a structured model's config (stored in its checkpoints), else NULL
    size_t num_params;
    float *master_host;                // fp32 weights on the host: built/loaded here; a structured model's checkpoints go through it
    // device
    floatX *params, *grads;            // bf16, in the parameter table's flat layout
    float *master, *m, *v;             // fp32 master weights (NULL with -w 0) and AdamW moments
    int no_master;                     // -w 0: no master weights; AdamW updates the bf16 weights in place
    int eval_only;                     // -x 0: no gradients or AdamW moments either (NULL)
    int recompute;                     // -r: 0 none, 1 GELU, 2 GELU and LayerNorm
    int max_B, max_T;
    Acts acts;
    floatX *proj, *dres, *dln, *dbig, *datty;  // scratch (proj: projections before the residual add)
    AttnScratch attn;
    float *colsum_scratch;
    double *norm_scratch;
    int *d_inputs, *d_targets, *d_buckets;
    int *h_inputs, *h_targets;         // pinned: the batch's copies to the GPU do not wait for the queue
    cudaEvent_t inputs_copied;         // recorded after those copies: the next batch may overwrite them once it has passed
    int *h_count;
    int *h_buckets;                    // pinned: its copy to d_buckets does not wait for the queued backward
    cudaEvent_t buckets_copied;        // recorded after that copy: h_buckets may be rebuilt once it has passed
    float *h_losses;
    // a training step's losses, read once per step: micro-batch k's losses and routing (d_aux,
    // aux_slots + B x T floats) are copied into slot k of this pinned buffer behind its backward
    float *h_step_losses;
    int step_slots;
    cudaEvent_t losses_copied;         // recorded after the last of those copies
    int n_unique;                      // distinct tokens of the last batch (encoder backward)
    int B, T;                          // of the last forward
    int have_targets, dlogits_ready;
    // structured layers
    LinearState *lin;                  // [L * NUM_BLOCK_ROLES + 1]: block layers, then the head
    floatX *st_scratch;                // shared by every structured layer (plans' T1..T3, BTT-MoE's gathered rows)
    size_t st_scratch_elems;
    uint8_t *kernels;                  // [num linears] each layer's kernels as its resume state keeps them (structured/tune.cuh)
    int kernels_restored;              // -at 1 resumed: the kernels came from the state, not timed
    float *st_fscratch;                // BTT-MoE fp32 scratch
    floatX *split_a, *split_b;         // (B, T, C): a separate q, k or v and its input gradient
    MoERouting routing;                // BTT-MoE aux loss and routing of the last forward, over the routed layers (gpt2_read_loss)
    int n_routed;
    float *d_aux;                      // (aux_slots) each routed layer's MoERouting, on the device; acts.losses follows
    int aux_slots, aux_next;           // 4 floats per routed layer (16-byte aligned losses); the next layer's slot
    // attention: flash (our kernel, cuda/flash_attention.cuh), cuDNN's (cuda/cudnn_attention.h,
    // -fa 2) or cuBLAS + softmax (cuda/attention.cuh); see attention_forward_any
    int flash, cudnn;
    float *lse;                        // flash or cuDNN: (L, B, NH, T) logsumexp per query row
    float *flash_scratch;              // flash backward: (B, NH, T)
    // data parallel: ranks, ZeRO-1 slice (params, grads and master hold zero.padded elements;
    // m and v zero.shard), and whether BTT-MoE layers sum their routing statistics over ranks
    const MultiProc *mp;
    ZeroShard zero;
    AdamWPlan adamw;  // the update's chunk table for this rank's slice (built at the first update)
    int sync_aux;
    // the gradients' averaging over ranks, started block by block in the last micro-step's backward:
    // block l's ranges are grad_ranges[grad_first[l] .. grad_first[l + 1]), l = L the tensors in no block
    ParamRange *grad_ranges;
    int *grad_first;                   // [L + 2]
    int average_in_backward;           // this backward is the step's last: start the averaging
    int grads_averaging;               // started, not yet joined (trainer_mean_grads)
} GPT2;

static floatX *P_(const GPT2 *m, floatX *base, int idx) { return base + m->layout.params.t[idx].offset; }

// ----------------------------------------------------------------------------------------------
// Linear layers: the one place a linear layer is computed, whatever its structure (as the CPU
// trainer's linear_forward/linear_backward). Dense goes to cuBLASLt; the structured kernels of
// issue 5 plug in here.

static LinearState *lin_state(GPT2 *m, const LinearDesc *ld) {
    return &m->lin[ld->layer < 0 ? m->config.num_layers * NUM_BLOCK_ROLES : ld->layer * NUM_BLOCK_ROLES + ld->role];
}

// out (N, d_out) from inp (N, d_in). With pre_gelu: pre_gelu = the layer's output and
// out = GELU(pre_gelu) (the fc layer; fused into the last op's epilogue when possible). A BTT-MoE
// layer writes its aux loss and routing to its slot of m->d_aux (read with the loss: no host wait here).
// out_ld (0: d_out): out's row stride, for a layer that linear_takes_strides.
static void linear_forward(GPT2 *m, const LinearDesc *ld, floatX *out, const floatX *inp, int N, floatX *pre_gelu, int out_ld = 0) {
    const LinearSpec *s = &ld->spec;
    const floatX *b = ld->bias >= 0 ? P_(m, m->params, ld->bias) : NULL;
    const floatX *w0 = P_(m, m->params, ld->w[0]), *w1 = ld->nw > 1 ? P_(m, m->params, ld->w[1]) : NULL;
    LinearState *ls = lin_state(m, ld);
    prof_mark_linear(ld, 0, N, ls->as_dense);
    if (s->kind == STRUCT_DENSE) { matmul_forward(out, inp, w0, b, N, s->d_in, s->d_out, pre_gelu); return; }
    const int sk_setting = g_st_sk;  // this layer runs its own kernels (-at 1: chosen per layer); the setting is restored after
    st_set_kernels(ls->sk);
    switch (s->kind) {
        case STRUCT_BTT: {
            BTTShape bs = btt_shape_of(s);
            if (ls->as_dense) st_dense_forward(out, pre_gelu, inp, w0, w1, b, N, STRUCT_BTT, &bs, m->st_scratch);
            else btt_forward_gpu(out, ls->inter, inp, w0, w1, b, N, &bs, m->st_scratch, pre_gelu, out_ld);
            break;
        }
        case STRUCT_MONARCH: {
            MonarchShape ms = monarch_shape_of(s);
            if (ls->as_dense) st_dense_forward(out, pre_gelu, inp, w0, w1, b, N, STRUCT_MONARCH, &ms, m->st_scratch);
            else monarch_forward_gpu(out, ls->inter, inp, w0, w1, b, N, &ms, m->st_scratch, pre_gelu, out_ld);
            break;
        }
        default: {
            MoEShape ms = moe_shape_of(s);
            MoEGPUScratch sc;
            moe_gpu_scratch_bind(&sc, &ls->moe, &ms, N, m->st_scratch, m->st_fscratch);
            moe_forward_gpu(out, &ls->moe, &sc, inp, w0, w1, P_(m, m->params, ld->w[2]), b, N, &ms, pre_gelu, out_ld);
            st_step("aux loss statistics");
            moe_aux_stats_gpu(&ls->moe, &ms);
            long n_total = N;
            if (m->sync_aux && m->mp && m->mp->nproc > 1) {  // the global batch's routing statistics
                multigpu_sum_device_doubles(ls->moe.stats, MOE_AUX_STATS(ms.experts));
                n_total *= m->mp->nproc;
            }
            if (m->aux_next >= m->n_routed) fatal("internal: more BTT-MoE layers ran than the %d counted", m->n_routed);
            moe_aux_finish_gpu(&ls->moe, n_total, &ms, (MoERouting *)m->d_aux + m->aux_next++);
            break;
        }
    }
    st_set_kernels(sk_setting);
}

// dinp (N, d_in) is overwritten (may be NULL); the layer's gradients are accumulated. With
// pre_gelu (the forward's pre-activation whose GELU was this layer's input), dinp is the
// gradient with respect to pre_gelu instead. daux: d(loss)/d(this layer's aux loss), BTT-MoE only.
// dout_ld (0: d_out): dout's row stride; dinp_acc: dinp += instead of =; both for a layer that
// linear_takes_strides.
static void linear_backward(GPT2 *m, const LinearDesc *ld, floatX *dinp, const floatX *dout, const floatX *inp, int N, const floatX *pre_gelu,
                            float daux, int dout_ld = 0, int dinp_acc = 0) {
    const LinearSpec *s = &ld->spec;
    floatX *db = ld->bias >= 0 ? P_(m, m->grads, ld->bias) : NULL;
    const floatX *w0 = P_(m, m->params, ld->w[0]), *w1 = ld->nw > 1 ? P_(m, m->params, ld->w[1]) : NULL;
    floatX *dw0 = P_(m, m->grads, ld->w[0]), *dw1 = ld->nw > 1 ? P_(m, m->grads, ld->w[1]) : NULL;
    LinearState *ls = lin_state(m, ld);
    prof_mark_linear(ld, 1, N, ls->as_dense);
    if (s->kind == STRUCT_DENSE) {
        matmul_backward(dinp, dw0, db, dout, inp, w0, N, s->d_in, s->d_out, pre_gelu, m->colsum_scratch);
        return;
    }
    const int sk_setting = g_st_sk;
    st_set_kernels(ls->sk_bwd);
    switch (s->kind) {
        case STRUCT_BTT: {
            BTTShape bs = btt_shape_of(s);
            if (ls->as_dense)
                st_dense_backward(dinp, dw0, dw1, db, dout, inp, w0, w1, N, STRUCT_BTT, &bs, m->st_scratch, m->colsum_scratch, pre_gelu);
            else btt_backward_gpu(dinp, dw0, dw1, db, dout, inp, ls->inter, w0, w1, N, &bs, m->st_scratch, m->colsum_scratch, pre_gelu, dout_ld,
                                  dinp_acc);
            break;
        }
        case STRUCT_MONARCH: {
            MonarchShape ms = monarch_shape_of(s);
            if (ls->as_dense)
                st_dense_backward(dinp, dw0, dw1, db, dout, inp, w0, w1, N, STRUCT_MONARCH, &ms, m->st_scratch, m->colsum_scratch, pre_gelu);
            else monarch_backward_gpu(dinp, dw0, dw1, db, dout, inp, ls->inter, w0, w1, N, &ms, m->st_scratch, m->colsum_scratch, pre_gelu,
                                      dout_ld, dinp_acc);
            break;
        }
        default: {
            MoEShape ms = moe_shape_of(s);
            MoEGPUScratch sc;
            moe_gpu_scratch_bind(&sc, &ls->moe, &ms, N, m->st_scratch, m->st_fscratch);
            moe_backward_gpu(dinp, dw0, dw1, P_(m, m->grads, ld->w[2]), db, dout, daux, inp, &ls->moe, &sc, w0, w1, P_(m, m->params, ld->w[2]),
                             &ms, m->colsum_scratch, pre_gelu, dout_ld, dinp_acc);
            break;
        }
    }
    st_set_kernels(sk_setting);
}

// ----------------------------------------------------------------------------------------------
// Building: the same sources as the CPU trainer (-e dN, llm.c checkpoint v3/v5, config file)

static void gpt2_setup(GPT2 *m, const char *where) {
    const GPT2Layout *g = &m->layout;
    m->config = g->config;
    if (m->config.channels % 8 != 0)
        fatal("'%s': n_embd = %d; the GPU trainer needs n_embd divisible by 8 (16-byte bf16 vectors); use ./train_gpt2 for this model",
              where, m->config.channels);
    m->num_params = g->params.total;
    for (int i = 0; i < gpt2_num_linears(g); i++) {
        const LinearDesc *ld = gpt2_linear_at(g, i);
        if (!ld->used) continue;
        if (ld->spec.kind == STRUCT_BTT_MOE) m->n_routed++;
        if (ld->spec.experts > 1024) fatal("'%s': %d experts; the GPU trainer handles up to 1024", where, ld->spec.experts);
    }
    m->master_host = (float *)callocCheck(m->num_params, sizeof(float));
}

[[maybe_unused]] static void gpt2_build_from_config_text(GPT2 *m, const char *where, const char *text) {
    memset(m, 0, sizeof(*m));
    m->config_text = gpt2_layout_from_config_text(&m->layout, where, text);
    gpt2_setup(m, where);
}

// -e argument: an llm.c checkpoint (version 3 fp32 or 5 bf16), "dN", or a model config file.
// Fills the host fp32 weights; gpt2_alloc puts them on the GPU.
static void gpt2_build(GPT2 *m, const char *spec) {
    memset(m, 0, sizeof(*m));
    ModelSource src;
    gpt2_layout_from_spec(&m->layout, spec, &src);
    m->config_text = src.config_text;
    gpt2_setup(m, spec);
    if (src.fp) {
        model_params_read(src.fp, spec, src.version, m->master_host, m->num_params);
        fcloseCheck(src.fp, spec);
    } else {
        gpt2_init_random(&m->layout, m->master_host, 42);
    }
}

// Device memory for batches up to B x T: weights (from master_host), gradients, AdamW moments,
// activations and scratch. Every buffer is named, so running out of memory says which.
// Elements of the buffers the ZeRO-1 collectives touch (params, grads, master), and of m and v.
static size_t gpt2_padded_len(const GPT2 *m) { return m->zero.padded > m->num_params ? m->zero.padded : m->num_params; }
static size_t gpt2_moments_len(const GPT2 *m) { return m->zero.stage ? m->zero.shard : m->num_params; }

// One layer's logsumexp rows, (B, NH, T), rounded up to 4 floats so that every layer's starts
// 16-byte aligned, as cuDNN wants its tensors.
static size_t lse_layer_len(size_t B, size_t NH, size_t T) { return (B * NH * T + 3) / 4 * 4; }

#ifdef USE_CUDNN
// Whether cuDNN's attention runs at this (B, T): -fa 2 prepares the training shape at allocation,
// and sampling's growing T takes our flash kernel where it applies, so that cuDNN does not build
// (and compile) a graph per sampled token. A cuDNN-only head size builds one per shape.
static int attention_on_cudnn(const GPT2 *m, int B, int T) { return m->cudnn && (!m->flash || (B == m->max_B && T == m->max_T)); }
#endif

// -fa 2: 1 when cuDNN takes attention at (B, T); else a note says why (or, in a build without
// cuDNN, an error says how to get it)
static int gpt2_try_cudnn(const GPT2 *m, int B, int T) {
#ifdef USE_CUDNN
    const GPT2Config *c = &m->config;
    char why[512];
    if (cudnn_attention_prepare(B, T, c->num_heads, c->channels / c->num_heads, why, sizeof(why))) return 1;
    printf("note: -fa 2: cuDNN cannot run attention at B=%d T=%d NH=%d HS=%d (%s); using -fa 1\n", B, T, c->num_heads,
           c->channels / c->num_heads, why);
    return 0;
#else
    (void)m; (void)B; (void)T;
    fatal("-fa 2 (cuDNN attention): this build has no cuDNN; rebuild with the cuDNN frontend headers (README, \"cuDNN attention\") "
          "or use -fa 1 (our flash kernel)");
    return 0;
#endif
}

// The master weights and the bf16 weights from all of master_host (every rank holds all of it),
// rounded as update t left them (master_to_bf16); with -w 0 through a temporary fp32 buffer,
// freed before the activations are allocated.
static void gpt2_upload_weights(GPT2 *m, long t) {
    size_t np = gpt2_padded_len(m);
    float *src = m->master ? m->master : cudaMallocNamed(float, np, "fp32 weights while they are rounded to bf16 (-w 0)");
    cudaCheck(cudaMemcpy(src, m->master_host, np * sizeof(float), cudaMemcpyHostToDevice));
    master_to_bf16(&m->layout.params, m->params, src, t);
    if (!m->master) {
        cudaCheck(cudaFree(src));
        g_gpu_bytes -= np * sizeof(float);
    }
}

// Which BTT and Monarch layers run as dense GEMMs on their materialized weight: all of them with
// -sm 1; with -sm 2 those that exec_model.h models faster so at N rows (a micro-batch) on this GPU.
static void st_choose_as_dense(GPT2 *m, int N) {
    if (!g_st_dense) return;
    const PlanRates r = plan_rates(gpu_peak_bf16_tflops(g_gpu.prop.name), gpu_peak_gbps());
    for (int i = 0; i < gpt2_num_linears(&m->layout); i++) {
        const LinearDesc *ld = gpt2_linear_at(&m->layout, i);
        const int k = ld->spec.kind;
        if (!ld->used || (k != STRUCT_BTT && k != STRUCT_MONARCH)) continue;
        const BTTShape b = k == STRUCT_BTT ? btt_shape_of(&ld->spec) : BTTShape{};
        const MonarchShape ms = k == STRUCT_MONARCH ? monarch_shape_of(&ld->spec) : MonarchShape{};
        m->lin[i].as_dense = g_st_dense == 1 || st_as_dense_pays(k, k == STRUCT_BTT ? (const void *)&b : (const void *)&ms, N, g_st_sk == 4, &r);
    }
}

// Whether a layer's forward (bwd 0) writes its output into a column block of wider rows
// (linear_forward's out_ld), or its backward (bwd 1) reads its output gradient from one and adds
// its input gradient (linear_backward's dout_ld and dinp_acc): the cuBLAS plans (BTT and Monarch
// with -sk 0 or 4, not as dense; BTT-MoE), and BTT split (-sk 3: its cuBLAS halves take the strides,
// its stage 1 reads dy rows of any stride). The others (dense, the fused kernels, layers run as
// dense) go through the split buffers and copies, except q, k and v as one dense group
// (qkv_dense_group).
static int linear_takes_strides(GPT2 *m, const LinearDesc *ld, int bwd) {
    const int k = ld->spec.kind;
    if (k == STRUCT_BTT_MOE) return 1;
    const LinearState *ls = lin_state(m, ld);
    if (ls->as_dense) return 0;
    const int sk = bwd ? ls->sk_bwd : ls->sk;
    return (k == STRUCT_BTT && (!sk || sk == 3 || sk == 4)) || (k == STRUCT_MONARCH && (!sk || sk == 4));
}

// When q, k and v all run as dense (BTT or Monarch; -sm 1, or -sm 2's model): fills g with them
// (and their weights and gradients, where allocated) and returns 1; they then run as one dense
// layer of width 3C (st_dense_group_*), as a dense model's fused qkv.
static int qkv_dense_group(GPT2 *m, int l, StDenseLayer g[3]) {
    for (int r = SR_Q; r <= SR_V; r++) {
        const LinearDesc *ld = gpt2_linear(&m->layout, l, r);
        const int k = ld->spec.kind;
        if (ld->fused_qkv || !lin_state(m, ld)->as_dense) return 0;
        StDenseLayer *e = &g[r - SR_Q];
        memset(e, 0, sizeof(*e));
        e->kind = k;
        if (k == STRUCT_BTT) e->btt = btt_shape_of(&ld->spec);
        else e->monarch = monarch_shape_of(&ld->spec);
        if (m->params) {
            e->W0 = P_(m, m->params, ld->w[0]); e->W1 = P_(m, m->params, ld->w[1]);
            if (ld->bias >= 0) e->bias = P_(m, m->params, ld->bias);
        }
        if (m->grads) {
            e->dW0 = P_(m, m->grads, ld->w[0]); e->dW1 = P_(m, m->grads, ld->w[1]);
            if (ld->bias >= 0) e->dbias = P_(m, m->grads, ld->bias);
        }
    }
    return 1;
}

// Scratch elements the structured layers need at max_B x max_T rows with their kernels as chosen
// now, and in *fscratch BTT-MoE's fp32 scratch; *separate_qkv set when some q, k or v needs the
// split buffers. With alloc, allocates the saved state (z, u; BTT-MoE's) of each layer that needs
// it and has none.
static size_t st_layers_need(GPT2 *m, int alloc, size_t *fscratch, int *separate_qkv) {
    const GPT2Layout *g = &m->layout;
    const int BT = m->max_B * m->max_T;
    size_t scratch = 0;
    for (int i = 0; i < gpt2_num_linears(g); i++) {
        const LinearDesc *ld = gpt2_linear_at(g, i);
        if (!ld->used) continue;
        if (ld->layer >= 0 && ld->role == SR_Q && !ld->fused_qkv) {
            StDenseLayer grp[3];
            const int group = qkv_dense_group(m, ld->layer, grp);
            if (group) {  // one dense layer of width 3C
                const size_t need = st_dense_group_elems(grp, 3);
                if (need > scratch) scratch = need;
            }
            for (int r = SR_Q; r <= SR_V && !group; r++) {
                const LinearDesc *x = gpt2_linear(g, ld->layer, r);
                if (!linear_takes_strides(m, x, 0) || !linear_takes_strides(m, x, 1)) *separate_qkv = 1;
            }
        }
        const LinearSpec *s = &ld->spec;
        if (s->kind == STRUCT_DENSE) continue;
        if (s->d_in % 8 || s->d_out % 8)
            fatal("layer %d %s: %s %d -> %d; the GPU trainer needs both sizes divisible by 8", ld->layer, struct_role_names[ld->role],
                  struct_names[s->kind], s->d_in, s->d_out);
        char what[96];
        snprintf(what, sizeof(what), "layer %d %s (%s)", ld->layer, ld->layer < 0 ? "lm_head" : struct_role_names[ld->role], struct_names[s->kind]);
        LinearState *ls = &m->lin[i];
        size_t need = 0;
        if (s->kind == STRUCT_BTT && ls->as_dense) {  // dense GEMMs on W materialized in the scratch: nothing kept per layer
            BTTShape b = btt_shape_of(s);
            need = btt_dense_elems(&b);
        } else if (s->kind == STRUCT_MONARCH && ls->as_dense) {
            MonarchShape ms = monarch_shape_of(s);
            need = monarch_dense_elems(&ms);
        } else if (s->kind == STRUCT_BTT) {
            BTTShape b = btt_shape_of(s);
            if (alloc && !ls->inter) ls->inter = cudaMallocNamed(floatX, btt_z_size(&b, BT), what);
            need = btt_gpu_scratch_elems(&b, BT);
        } else if (s->kind == STRUCT_MONARCH) {
            MonarchShape ms = monarch_shape_of(s);
            if (alloc && !ls->inter) ls->inter = cudaMallocNamed(floatX, monarch_u_size(&ms, BT), what);
            need = monarch_gpu_scratch_elems(&ms, BT);
        } else {
            MoEShape ms = moe_shape_of(s);
            // -at 1: the set path's arrays wherever the shape takes it (a choice to time), else where -mg asks
            if (alloc && !ls->moe.capacity) moe_gpu_state_alloc(&ls->moe, &ms, BT, what, g_st_tune ? 1 : -1);
            const MoEScratchLayout sl = ls->moe.capacity ? moe_state_scratch_layout(&ls->moe, &ms) : moe_scratch_layout_for(&ms, BT);
            need = sl.bf16_end;
            if (sl.f32_end > *fscratch) *fscratch = sl.f32_end;
        }
        if (need > scratch) scratch = need;
    }
    return scratch;
}

// Elements per row of a BTT or Monarch layer's saved state (z, u), and its bytes at max_B x max_T rows.
static size_t st_inter_row(const LinearSpec *s) {
    if (s->kind == STRUCT_BTT) { BTTShape b = btt_shape_of(s); return btt_z_row(&b); }
    MonarchShape ms = monarch_shape_of(s);
    return monarch_u_row(&ms);
}
static size_t st_inter_bytes(const GPT2 *m, const LinearSpec *s) { return (size_t)m->max_B * m->max_T * st_inter_row(s) * sizeof(floatX); }

// Sets every structured layer's kernels to k (structured/tune.cuh's byte; dense: the BTT and
// Monarch layers only).
static void st_set_all_kernels(GPT2 *m, int k) {
    for (int i = 0; i < gpt2_num_linears(&m->layout); i++) {
        const LinearDesc *ld = gpt2_linear_at(&m->layout, i);
        if (!ld->used || !st_kind_tunable(ld->spec.kind) || (k == ST_K_DENSE && !st_kind_densifiable(ld->spec.kind))) continue;
        lin_set_kernels(&m->lin[i], k);
    }
}

// The structured layers' buffers for their kernels as chosen now, or with room for every choice
// -at 1 may time (all dense, all fused: the most scratch, and the q/k/v split buffers; BTT-MoE's
// set path): each layer's saved state allocated where it needs one, freed where it runs as dense
// (not with room), a BTT-MoE layer's with the set path's arrays (and its larger z) only where it
// groups by set (not with room); the shared scratch and the split buffers allocated, resized or
// freed to what the choices need.
static void st_buffers_fit(GPT2 *m, int room) {
    const int n = gpt2_num_linears(&m->layout);
    const size_t BTC = (size_t)m->max_B * m->max_T * m->config.channels;
    size_t fscratch = 0;
    int separate_qkv = 0;
    size_t scratch;
    for (int i = 0; i < n; i++) {  // BTT-MoE: the set path's arrays for -at 1 to time it, else only where the layer groups by set
        const LinearDesc *ld = gpt2_linear_at(&m->layout, i);
        if (!ld->used || ld->spec.kind != STRUCT_BTT_MOE) continue;
        const MoEShape ms = moe_shape_of(&ld->spec);
        moe_gpu_state_refit(&m->lin[i].moe, &ms, room || m->lin[i].moe.use_sets, "BTT-MoE layer (its kernels chosen)");
    }
    if (room) {
        g_oom_note = ST_TUNE_OOM_NOTE;
        int *keep = (int *)mallocCheck((size_t)n * sizeof(int));
        for (int i = 0; i < n; i++) keep[i] = lin_kernels(&m->lin[i]);
        st_set_all_kernels(m, ST_K_DENSE);
        scratch = st_layers_need(m, 1, &fscratch, &separate_qkv);
        st_set_all_kernels(m, 1);
        const size_t fused = st_layers_need(m, 1, &fscratch, &separate_qkv);
        if (fused > scratch) scratch = fused;
        for (int i = 0; i < n; i++) lin_set_kernels(&m->lin[i], keep[i]);  // the choices back, with the buffers just allocated
        free(keep);
    } else {
        scratch = st_layers_need(m, 1, &fscratch, &separate_qkv);
        for (int i = 0; i < n; i++) {
            LinearState *ls = &m->lin[i];
            if (!ls->as_dense || !ls->inter) continue;
            cuda_free_named(ls->inter, st_inter_bytes(m, &gpt2_linear_at(&m->layout, i)->spec));
            ls->inter = NULL;
        }
    }
    if (scratch != m->st_scratch_elems) {
        cuda_free_named(m->st_scratch, m->st_scratch_elems * sizeof(floatX));
        m->st_scratch = scratch ? cudaMallocNamed(floatX, scratch, "scratch: structured layers (shared by all)") : NULL;
        m->st_scratch_elems = scratch;
    }
    if (fscratch && !m->st_fscratch) m->st_fscratch = cudaMallocNamed(float, fscratch, "scratch: BTT-MoE fp32 (gates, logits gradients, statistics)");
    if (separate_qkv && !m->split_a) {
        m->split_a = cudaMallocNamed(floatX, BTC, "scratch: separate q/k/v output");
        m->split_b = cudaMallocNamed(floatX, BTC, "scratch: separate q/k/v input gradient");
    } else if (!separate_qkv && m->split_a) {
        cuda_free_named(m->split_a, BTC * sizeof(floatX));
        cuda_free_named(m->split_b, BTC * sizeof(floatX));
        m->split_a = m->split_b = NULL;
    }
    g_oom_note = NULL;
}

// flash: 1 our flash-attention kernel where it supports the head size, 2 cuDNN's where it runs the
// shape (else as 1), else the cuBLAS path.
static void gpt2_alloc(GPT2 *m, int B, int T, int recompute, int flash) {
    const GPT2Config *c = &m->config;
    if (T > c->max_seq_len) fatal("-t %d is longer than the model's max_seq_len %d; use -t <= %d", T, c->max_seq_len, c->max_seq_len);
    g_oom_hint_B = B;
    m->recompute = recompute;
    m->max_B = B;
    m->max_T = T;
    size_t n = m->num_params, BT = (size_t)B * T, C = (size_t)c->channels, L = (size_t)c->num_layers, NH = (size_t)c->num_heads;
    size_t Vp = (size_t)c->padded_vocab_size, att = (size_t)B * NH * T * T;
    m->flash = flash && flash_attention_supported(c->channels / c->num_heads, T);
    m->cudnn = flash == 2 && gpt2_try_cudnn(m, B, T);
    size_t np = gpt2_padded_len(m), nm = gpt2_moments_len(m);
    if (np > n) {  // ZeRO-1: the last slice ends in padding, on the host too
        float *h = (float *)callocCheck(np, sizeof(float));
        memcpy(h, m->master_host, n * sizeof(float));
        free(m->master_host);
        m->master_host = h;
    }
    g_oom_weights = 1;
    m->params = cudaMallocNamed(floatX, np, "parameters (bf16)");
    cudaCheck(cudaMemset(m->params, 0, np * sizeof(floatX)));
    if (!m->eval_only) {  // an evaluation (-x 0) keeps 2 bytes per parameter, not 16
        m->grads = cudaMallocNamed(floatX, np, "gradients (bf16)");
        if (!m->no_master) m->master = cudaMallocNamed(float, np, "master weights (fp32; -w 0 goes without)");
        m->m = cudaMallocNamed(float, nm, "AdamW first moments (fp32; this rank's slice with -z 1)");
        m->v = cudaMallocNamed(float, nm, "AdamW second moments (fp32; this rank's slice with -z 1)");
        cudaCheck(cudaMemset(m->grads, 0, np * sizeof(floatX)));
        cudaCheck(cudaMemset(m->m, 0, nm * sizeof(float)));
        cudaCheck(cudaMemset(m->v, 0, nm * sizeof(float)));
    }
    gpt2_upload_weights(m, 0);  // (with -w 0 through a temporary fp32 copy)
    g_oom_weights = 0;

    Acts *a = &m->acts;
    size_t ln_layers = recompute >= 2 ? 1 : L, gelu_layers = recompute >= 1 ? 1 : L;
    a->encoded = cudaMallocNamed(floatX, BT * C, "activations: encoded (B x T x C)");
    a->ln1 = cudaMallocNamed(floatX, ln_layers * BT * C, "activations: ln1 (L x B x T x C; one layer with -r 2)");
    a->ln1_mean = cudaMallocNamed(float, L * BT, "activations: ln1 mean");
    a->ln1_rstd = cudaMallocNamed(float, L * BT, "activations: ln1 rstd");
    a->qkv = cudaMallocNamed(floatX, L * BT * 3 * C, "activations: qkv (L x B x T x 3C)");
    if (m->flash || m->cudnn) {
        m->lse = cudaMallocNamed(float, L * lse_layer_len(B, NH, T), "activations: attention logsumexp (L x B x NH x T fp32)");
        m->flash_scratch = cudaMallocNamed(float, (size_t)B * NH * T, "scratch: flash-attention backward (B x NH x T)");
    } else {
        a->att = cudaMallocNamed(floatX, L * att, "activations: attention probabilities (L x B x NH x T x T; -fa 1 avoids it)");
    }
    a->atty = cudaMallocNamed(floatX, L * BT * C, "activations: attention output (L x B x T x C)");
    a->res2 = cudaMallocNamed(floatX, L * BT * C, "activations: residual 2 (L x B x T x C)");
    a->ln2 = cudaMallocNamed(floatX, ln_layers * BT * C, "activations: ln2 (L x B x T x C; one layer with -r 2)");
    a->ln2_mean = cudaMallocNamed(float, L * BT, "activations: ln2 mean");
    a->ln2_rstd = cudaMallocNamed(float, L * BT, "activations: ln2 rstd");
    a->fch = cudaMallocNamed(floatX, L * BT * 4 * C, "activations: fc pre-GELU (L x B x T x 4C)");
    a->fch_gelu = cudaMallocNamed(floatX, gelu_layers * BT * 4 * C, "activations: fc GELU (L x B x T x 4C; one layer with -r >= 1)");
    a->res3 = cudaMallocNamed(floatX, L * BT * C, "activations: residual 3 (L x B x T x C)");
    a->lnf = cudaMallocNamed(floatX, BT * C, "activations: lnf (B x T x C)");
    a->lnf_mean = cudaMallocNamed(float, BT, "activations: lnf mean");
    a->lnf_rstd = cudaMallocNamed(float, BT, "activations: lnf rstd");
    a->logits = cudaMallocNamed(floatX, BT * Vp, "activations: logits (B x T x padded vocab)");
    static_assert(sizeof(MoERouting) == 4 * sizeof(float), "a routed layer's slot is 4 floats");
    m->aux_slots = 4 * m->n_routed;
    m->d_aux = cudaMallocNamed(float, m->aux_slots + BT, "activations: BTT-MoE aux losses and routing, and losses (B x T fp32)");
    a->losses = m->d_aux + m->aux_slots;

    m->proj = cudaMallocNamed(floatX, BT * C, "scratch: projection output");
    m->dres = cudaMallocNamed(floatX, BT * C, "scratch: residual gradient");
    m->dln = cudaMallocNamed(floatX, BT * C, "scratch: LayerNorm output gradient");
    m->dbig = cudaMallocNamed(floatX, BT * 4 * C, "scratch: fc / qkv gradient (B x T x 4C)");
    m->datty = cudaMallocNamed(floatX, BT * C, "scratch: attention output gradient");
    AttnScratch *s = &m->attn;
    if (!m->flash && !m->cudnn) {
        floatX *qkvy = cudaMallocNamed(floatX, 7 * BT * C, "scratch: attention q, k, v, y, dq, dk, dv (7 x B x T x C)");
        s->q = qkvy; s->k = qkvy + BT * C; s->v = qkvy + 2 * BT * C; s->y = qkvy + 3 * BT * C;
        s->dq = qkvy + 4 * BT * C; s->dk = qkvy + 5 * BT * C; s->dv = qkvy + 6 * BT * C;
        s->scores = cudaMallocNamed(float, att, "scratch: attention scores fp32 (B x NH x T x T)");
    }
    m->colsum_scratch = cudaMallocNamed(float, column_sums_scratch_floats(4 * (int)C), "scratch: column sums");
    m->norm_scratch = cudaMallocNamed(double, NORM_BLOCKS + 1, "scratch: gradient norm");
    m->d_inputs = cudaMallocNamed(int, BT, "inputs");
    m->d_targets = cudaMallocNamed(int, BT, "targets");
    m->d_buckets = cudaMallocNamed(int, 3 * BT + 2, "encoder backward buckets");
    cudaCheck(cudaMallocHost((void **)&m->h_inputs, BT * sizeof(int)));
    cudaCheck(cudaMallocHost((void **)&m->h_targets, BT * sizeof(int)));
    cudaCheck(cudaEventCreateWithFlags(&m->inputs_copied, cudaEventDisableTiming));
    cudaCheck(cudaMallocHost((void **)&m->h_buckets, (3 * BT + 2) * sizeof(int)));
    cudaCheck(cudaEventCreateWithFlags(&m->buckets_copied, cudaEventDisableTiming));
    m->h_count = (int *)callocCheck((size_t)c->vocab_size, sizeof(int));
    m->h_losses = (float *)mallocCheck((m->aux_slots + BT) * sizeof(float));

    // structured layers: their kernels (-sk, -sm), what each keeps for its backward, one shared scratch
    m->lin = (LinearState *)callocCheck(L * NUM_BLOCK_ROLES + 1, sizeof(LinearState));
    m->kernels = (uint8_t *)mallocCheck((size_t)gpt2_num_linears(&m->layout));
    for (int i = 0; i < gpt2_num_linears(&m->layout); i++) m->lin[i].sk = m->lin[i].sk_bwd = g_st_sk;
    st_choose_as_dense(m, (int)BT);
    st_buffers_fit(m, g_st_tune);
}

// Sets the weights from host fp32 (tests): master = p, bf16 = round to nearest, moments zero.
[[maybe_unused]] static void gpt2_set_params(GPT2 *m, const float *p) {
    memcpy(m->master_host, p, m->num_params * sizeof(float));
    gpt2_upload_weights(m, 0);
    cudaCheck(cudaMemset(m->m, 0, m->num_params * sizeof(float)));
    cudaCheck(cudaMemset(m->v, 0, m->num_params * sizeof(float)));
}

// Frees a pinned buffer once the last copy through it (the one `copied` was recorded after) has passed.
static void pinned_free(void *p, cudaEvent_t copied) {
    cudaCheck(cudaEventSynchronize(copied));
    cudaCheck(cudaFreeHost(p));
}

static void gpt2_free(GPT2 *m) {
    cudaCheck(cudaDeviceSynchronize());
#ifdef USE_CUDNN
    if (m->cudnn) cudnn_attention_destroy();
#endif
    void *dev[] = {m->params, m->grads, m->master, m->m, m->v, m->acts.encoded, m->acts.ln1, m->acts.ln1_mean, m->acts.ln1_rstd,
                   m->acts.qkv, m->acts.att, m->acts.atty, m->acts.res2, m->acts.ln2, m->acts.ln2_mean, m->acts.ln2_rstd, m->acts.fch,
                   m->acts.fch_gelu, m->acts.res3, m->acts.lnf, m->acts.lnf_mean, m->acts.lnf_rstd, m->acts.logits, m->d_aux,
                   m->proj, m->dres, m->dln, m->dbig, m->datty, m->attn.q, m->attn.scores, m->colsum_scratch, m->norm_scratch,
                   m->d_inputs, m->d_targets, m->d_buckets, m->lse, m->flash_scratch};
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++)
        if (dev[i]) cudaCheck(cudaFree(dev[i]));
    if (m->lin) {
        for (int i = 0; i <= m->config.num_layers * NUM_BLOCK_ROLES; i++) {
            if (m->lin[i].inter) cudaCheck(cudaFree(m->lin[i].inter));
            moe_gpu_state_free(&m->lin[i].moe);
        }
        free(m->lin);
    }
    adamw_plan_free(&m->adamw);
    void *st_dev[] = {m->st_scratch, m->st_fscratch, m->split_a, m->split_b};
    for (size_t i = 0; i < sizeof(st_dev) / sizeof(st_dev[0]); i++)
        if (st_dev[i]) cudaCheck(cudaFree(st_dev[i]));
    free(m->config_text);
    free(m->kernels);
    free(m->grad_ranges); free(m->grad_first);
    if (m->h_inputs) {  // gpt2_alloc's pinned buffers
        pinned_free(m->h_inputs, m->inputs_copied);
        pinned_free(m->h_targets, m->inputs_copied);
        pinned_free(m->h_buckets, m->buckets_copied);
        cudaCheck(cudaEventDestroy(m->inputs_copied));
        cudaCheck(cudaEventDestroy(m->buckets_copied));
    }
    if (m->h_step_losses) {
        pinned_free(m->h_step_losses, m->losses_copied);
        cudaCheck(cudaEventDestroy(m->losses_copied));
    }
    free(m->master_host); free(m->h_count); free(m->h_losses);
    gpt2_layout_free(&m->layout);
    memset(m, 0, sizeof(*m));
}

// ----------------------------------------------------------------------------------------------
// Forward, backward, update

// per-layer views (recompute shares one layer's buffer)
static floatX *act_ln(const GPT2 *m, floatX *base, int l) { return base + (m->recompute >= 2 ? 0 : (size_t)l * m->B * m->T * m->config.channels); }
static floatX *act_gelu(const GPT2 *m, int l) { return m->acts.fch_gelu + (m->recompute >= 1 ? 0 : (size_t)l * m->B * m->T * 4 * m->config.channels); }

// q, k and v from ln1 into qkv (N, 3C): one fused matmul when all three are dense or all three
// run as dense (qkv_dense_group); else three layers, each written into its column block (in place
// where the layer takes row strides).
static void qkv_forward(GPT2 *m, int l, floatX *qkv, const floatX *ln1, int N) {
    const LinearDesc *q = gpt2_linear(&m->layout, l, SR_Q);
    const int C = m->config.channels;
    if (q->fused_qkv) { linear_forward(m, q, qkv, ln1, N, NULL); return; }
    StDenseLayer grp[3];
    if (qkv_dense_group(m, l, grp)) {
        prof_mark_qkv_group(&m->layout, l, 0, N);
        st_dense_group_forward(qkv, ln1, N, grp, 3, m->st_scratch);
        return;
    }
    for (int r = SR_Q; r <= SR_V; r++) {
        const LinearDesc *ld = gpt2_linear(&m->layout, l, r);
        if (linear_takes_strides(m, ld, 0)) { linear_forward(m, ld, qkv + (size_t)r * C, ln1, N, NULL, 3 * C); continue; }
        linear_forward(m, ld, m->split_a, ln1, N, NULL);
        prof_mark("q, k, v split copies", 0.0);
        qkv_part_copy(qkv, m->split_a, r, N, C, 1);
    }
}

// dln (N, C) = the gradient of ln1 through q, k and v, from dqkv (N, 3C).
static void qkv_backward(GPT2 *m, int l, floatX *dln, const floatX *dqkv, const floatX *ln1, int N, float daux) {
    const LinearDesc *q = gpt2_linear(&m->layout, l, SR_Q);
    const int C = m->config.channels;
    if (q->fused_qkv) { linear_backward(m, q, dln, dqkv, ln1, N, NULL, daux); return; }
    StDenseLayer grp[3];
    if (qkv_dense_group(m, l, grp)) {
        prof_mark_qkv_group(&m->layout, l, 1, N);
        st_dense_group_backward(dln, dqkv, ln1, N, grp, 3, m->st_scratch, m->colsum_scratch);
        return;
    }
    for (int r = SR_Q; r <= SR_V; r++) {
        const LinearDesc *ld = gpt2_linear(&m->layout, l, r);
        if (linear_takes_strides(m, ld, 1)) {  // reads its block of dqkv, q writes dln, k and v add to it
            linear_backward(m, ld, dln, dqkv + (size_t)r * C, ln1, N, NULL, daux, 3 * C, r != SR_Q);
            continue;
        }
        prof_mark("q, k, v split copies", 0.0);
        qkv_part_copy((floatX *)dqkv, m->split_a, r, N, C, 0);
        linear_backward(m, ld, r == SR_Q ? dln : m->split_b, m->split_a, ln1, N, NULL, daux);
        if (r != SR_Q) {
            prof_mark("q, k, v split copies", 0.0);
            add_inplace(dln, m->split_b, (size_t)N * C);
        }
    }
}

// Attention of layer l: atty (B, T, C) from qkv (B, T, 3C) on the path gpt2_alloc chose.
static void attention_forward_any(GPT2 *m, int l, floatX *atty, const floatX *qkv, int B, int T) {
    const int C = m->config.channels, NH = m->config.num_heads;
    float *lse = m->lse + l * lse_layer_len(B, NH, T);
    prof_mark_attention(&m->config, 0, B, T);
#ifdef USE_CUDNN
    if (attention_on_cudnn(m, B, T)) { cudnn_attention_forward(atty, lse, qkv, B, T, NH, C / NH); return; }
#endif
    if (m->flash) flash_attention_forward(atty, lse, qkv, B, T, C, NH);
    else attention_forward(atty, m->acts.att + (size_t)l * B * NH * T * T, qkv, &m->attn, B, T, C, NH);
}

// dqkv (B, T, 3C), overwritten, from datty (B, T, C) and the forward's qkv and atty.
static void attention_backward_any(GPT2 *m, int l, floatX *dqkv, const floatX *datty, const floatX *qkv, const floatX *atty, int B, int T) {
    const int C = m->config.channels, NH = m->config.num_heads;
    const float *lse = m->lse + l * lse_layer_len(B, NH, T);
    prof_mark_attention(&m->config, 1, B, T);
#ifdef USE_CUDNN
    if (attention_on_cudnn(m, B, T)) { cudnn_attention_backward(dqkv, datty, qkv, atty, lse, B, T, NH, C / NH); return; }
#endif
    if (m->flash) flash_attention_backward(dqkv, datty, qkv, atty, lse, m->flash_scratch, B, T, C, NH);
    else attention_backward(dqkv, datty, qkv, m->acts.att + (size_t)l * B * NH * T * T, &m->attn, B, T, C, NH);
}

// Launches the forward over inputs (B, T). With targets, also the per-row losses; with
// dloss != 0 the classifier also leaves dlogits (= dloss * (softmax - onehot)) in the logits
// buffer for the backward (training: one pass over the logits instead of two).
static void gpt2_forward_launch(GPT2 *m, const int *inputs, const int *targets, int B, int T, float dloss) {
    if (!m->params) fatal("internal: gpt2_alloc was not called");
    if (B > m->max_B || T > m->max_T) fatal("internal: batch %dx%d exceeds the allocated %dx%d", B, T, m->max_B, m->max_T);
    const GPT2Config *c = &m->config;
    const GPT2Layout *g = &m->layout;
    int C = c->channels, V = c->vocab_size, Vp = c->padded_vocab_size, L = c->num_layers, BT = B * T;
    prof_mark("inputs checked and copied to the GPU", 0.0);
    for (int i = 0; i < BT; i++) {
        if (inputs[i] < 0 || inputs[i] >= V) fatal("token %d at position %d is outside the vocabulary [0, %d): wrong data for this model?", inputs[i], i, V);
        if (targets && (targets[i] < 0 || targets[i] >= V)) fatal("target token %d at position %d is outside the vocabulary [0, %d)", targets[i], i, V);
    }
    m->B = B;
    m->T = T;
    // through pinned buffers, so that the copies queue behind the previous micro-batch's work (which
    // still reads d_inputs and d_targets) without the host waiting for it; the buffers are
    // refilled once the previous batch's copies have passed, early in that micro-batch
    cudaCheck(cudaEventSynchronize(m->inputs_copied));
    memcpy(m->h_inputs, inputs, (size_t)BT * sizeof(int));
    cudaCheck(cudaMemcpyAsync(m->d_inputs, m->h_inputs, (size_t)BT * sizeof(int), cudaMemcpyHostToDevice, 0));
    if (targets) {
        memcpy(m->h_targets, targets, (size_t)BT * sizeof(int));
        cudaCheck(cudaMemcpyAsync(m->d_targets, m->h_targets, (size_t)BT * sizeof(int), cudaMemcpyHostToDevice, 0));
    }
    cudaCheck(cudaEventRecord(m->inputs_copied, 0));
    Acts *a = &m->acts;
    floatX *P = m->params;
    size_t btc = (size_t)BT * C;
    m->aux_next = 0;
    prof_mark("encoder fwd", 0.0);
    encoder_forward(a->encoded, m->d_inputs, P_(m, P, g->wte), P_(m, P, g->wpe), B, T, C);
    prof_mark("layernorm fwd (+ residual)", 0.0);
    layernorm_forward(act_ln(m, a->ln1, 0), a->ln1_mean, a->ln1_rstd, a->encoded, P_(m, P, g->norms[0].ln1w), P_(m, P, g->norms[0].ln1b), BT, C);
    const floatX *res = a->encoded;
    for (int l = 0; l < L; l++) {
        const BlockNorms *nm = &g->norms[l];
        floatX *ln1 = act_ln(m, a->ln1, l), *ln2 = act_ln(m, a->ln2, l);
        floatX *qkv = a->qkv + (size_t)l * btc * 3, *atty = a->atty + (size_t)l * btc, *res2 = a->res2 + (size_t)l * btc;
        floatX *fch = a->fch + (size_t)l * btc * 4, *res3 = a->res3 + (size_t)l * btc;
        qkv_forward(m, l, qkv, ln1, BT);
        attention_forward_any(m, l, atty, qkv, B, T);
        linear_forward(m, gpt2_linear(g, l, SR_ATTN_PROJ), m->proj, atty, BT, NULL);
        prof_mark("layernorm fwd (+ residual)", 0.0);
        fused_residual_layernorm_forward(res2, ln2, a->ln2_mean + (size_t)l * BT, a->ln2_rstd + (size_t)l * BT, res, m->proj,
                                         P_(m, P, nm->ln2w), P_(m, P, nm->ln2b), BT, C);
        linear_forward(m, gpt2_linear(g, l, SR_FC), act_gelu(m, l), ln2, BT, fch);
        linear_forward(m, gpt2_linear(g, l, SR_FC_PROJ), m->proj, act_gelu(m, l), BT, NULL);
        prof_mark("layernorm fwd (+ residual)", 0.0);
        if (l + 1 < L) {
            const BlockNorms *nx = &g->norms[l + 1];
            fused_residual_layernorm_forward(res3, act_ln(m, a->ln1, l + 1), a->ln1_mean + (size_t)(l + 1) * BT,
                                             a->ln1_rstd + (size_t)(l + 1) * BT, res2, m->proj, P_(m, P, nx->ln1w), P_(m, P, nx->ln1b), BT, C);
        } else {
            fused_residual_layernorm_forward(res3, a->lnf, a->lnf_mean, a->lnf_rstd, res2, m->proj, P_(m, P, g->lnfw), P_(m, P, g->lnfb), BT, C);
        }
        res = res3;
    }
    if (g->head.used) linear_forward(m, &g->head, a->logits, a->lnf, BT, NULL);
    else {
        prof_mark_tied_head(c, 0, BT);
        matmul_forward(a->logits, a->lnf, P_(m, P, g->wte), NULL, BT, C, Vp, NULL);
    }
    m->have_targets = targets != NULL;
    m->dlogits_ready = 0;
    if (targets) {
        prof_mark("classifier (softmax, loss, dlogits)", 0.0);
        fused_classifier(a->logits, a->losses, m->d_targets, BT, V, Vp, dloss);
        m->dlogits_ready = dloss != 0.0f;
    }
}

// The mean cross-entropy of the rows of a copy of d_aux on the host (h: aux_slots + B x T floats),
// summed in row order in double: deterministic. Also the routed layers' aux losses and routing,
// folded (routing.h), into *routing.
static float gpt2_losses_fold(const GPT2 *m, const float *h, int BT, MoERouting *routing) {
    *routing = (MoERouting){0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < m->n_routed; i++) moe_routing_fold(routing, (const MoERouting *)h + i, i);
    moe_routing_finish(routing, m->n_routed);
    double s = 0.0;
    for (int i = 0; i < BT; i++) s += h[m->aux_slots + i];
    return (float)(s / BT);
}

// Mean cross-entropy of the last forward with targets (synchronises; m->routing gets its
// routing, m->h_losses its per-row losses).
static float gpt2_read_loss(GPT2 *m) {
    multigpu_wait("the forward");  // a rank that died in a collective: an error, not a hang
    cudaCheck(cudaMemcpy(m->h_losses, m->d_aux, (size_t)(m->aux_slots + m->B * m->T) * sizeof(float), cudaMemcpyDeviceToHost));
    return gpt2_losses_fold(m, m->h_losses, m->B * m->T, &m->routing);
}

// As the CPU trainer: with targets returns the mean loss, else -1 (the logits stay for sampling).
static float gpt2_forward(GPT2 *m, const int *inputs, const int *targets, int B, int T) {
    gpt2_forward_launch(m, inputs, targets, B, T, 0.0f);
    return targets ? gpt2_read_loss(m) : -1.0f;
}

static void gpt2_zero_grad(GPT2 *m) { cudaCheck(cudaMemset(m->grads, 0, m->num_params * sizeof(floatX))); }

// The objective the optimizer minimises: cross-entropy plus the weighted BTT-MoE aux loss.
[[maybe_unused]] static float gpt2_total_loss(const GPT2 *m, float ce) {
    return ce + (m->n_routed > 0 ? m->layout.structure.moe_aux_weight * m->routing.aux : 0.0f);
}

// Starts averaging block l's gradients over the ranks (l = L: the tensors in no block) on NCCL's
// stream, after the backward work queued so far; the backward of the blocks below goes on meanwhile.
static void grads_average_block(GPT2 *m, int l) {
    if (!m->grad_ranges) return;
    multigpu_average_grad_ranges(m->grads, m->grad_ranges + m->grad_first[l], m->grad_first[l + 1] - m->grad_first[l], &m->zero);
    m->grads_averaging = 1;
}

// Backward of the last forward (which must have had targets) for
// dloss_scale * (mean cross-entropy + moe_aux_weight * aux), accumulated into the gradients
// (dloss_scale = 1/grad_accum_steps).
static void gpt2_backward(GPT2 *m, float dloss_scale) {
    if (!m->have_targets) fatal("internal: gpt2_backward needs a forward with targets first");
    const GPT2Config *c = &m->config;
    const GPT2Layout *g = &m->layout;
    int B = m->B, T = m->T, C = c->channels, V = c->vocab_size, Vp = c->padded_vocab_size, L = c->num_layers, BT = B * T;
    Acts *a = &m->acts;
    floatX *P = m->params, *G = m->grads;
    size_t btc = (size_t)BT * C;
    if (!m->dlogits_ready) {
        prof_mark("classifier (softmax, loss, dlogits)", 0.0);
        fused_classifier(a->logits, a->losses, m->d_targets, BT, V, Vp, dloss_scale / BT);
    }
    float daux = m->n_routed > 0 ? dloss_scale * g->structure.moe_aux_weight / (float)m->n_routed : 0.0f;
    const floatX *last = L > 0 ? a->res3 + (size_t)(L - 1) * btc : a->encoded;
    if (g->head.used) linear_backward(m, &g->head, m->dln, a->logits, a->lnf, BT, NULL, daux);
    else {
        prof_mark_tied_head(c, 1, BT);
        matmul_backward(m->dln, P_(m, G, g->wte), NULL, a->logits, a->lnf, P_(m, P, g->wte), BT, C, Vp, NULL, m->colsum_scratch);
    }
    prof_mark("layernorm bwd", 0.0);
    cudaCheck(cudaMemset(m->dres, 0, btc * sizeof(floatX)));
    layernorm_backward(m->dres, P_(m, G, g->lnfw), P_(m, G, g->lnfb), m->dln, last, P_(m, P, g->lnfw), a->lnf_mean, a->lnf_rstd, BT, C,
                       m->colsum_scratch);
    for (int l = L - 1; l >= 0; l--) {
        const BlockNorms *nm = &g->norms[l];
        const floatX *res_in = l == 0 ? a->encoded : a->res3 + (size_t)(l - 1) * btc;
        floatX *ln1 = act_ln(m, a->ln1, l), *ln2 = act_ln(m, a->ln2, l);
        floatX *qkv = a->qkv + (size_t)l * btc * 3, *atty = a->atty + (size_t)l * btc, *res2 = a->res2 + (size_t)l * btc;
        floatX *fch = a->fch + (size_t)l * btc * 4;
        float *ln1_mean = a->ln1_mean + (size_t)l * BT, *ln1_rstd = a->ln1_rstd + (size_t)l * BT;
        float *ln2_mean = a->ln2_mean + (size_t)l * BT, *ln2_rstd = a->ln2_rstd + (size_t)l * BT;
        // MLP: dres is the gradient of res3, and flows unchanged into res2 plus the MLP branch
        if (m->recompute >= 1) {
            prof_mark("gelu recompute", 0.0);
            gelu_forward(act_gelu(m, l), fch, btc * 4);
        }
        linear_backward(m, gpt2_linear(g, l, SR_FC_PROJ), m->dbig, m->dres, act_gelu(m, l), BT, fch, daux);  // dbig: grad of fch
        if (m->recompute >= 2) {
            prof_mark("layernorm recompute", 0.0);
            layernorm_forward(ln2, NULL, NULL, res2, P_(m, P, nm->ln2w), P_(m, P, nm->ln2b), BT, C);
        }
        linear_backward(m, gpt2_linear(g, l, SR_FC), m->dln, m->dbig, ln2, BT, NULL, daux);
        prof_mark("layernorm bwd", 0.0);
        layernorm_backward(m->dres, P_(m, G, nm->ln2w), P_(m, G, nm->ln2b), m->dln, res2, P_(m, P, nm->ln2w), ln2_mean, ln2_rstd, BT, C,
                           m->colsum_scratch);
        // attention
        linear_backward(m, gpt2_linear(g, l, SR_ATTN_PROJ), m->datty, m->dres, atty, BT, NULL, daux);
        attention_backward_any(m, l, m->dbig, m->datty, qkv, atty, B, T);  // dbig: dqkv (B, T, 3C)
        if (m->recompute >= 2) {
            prof_mark("layernorm recompute", 0.0);
            layernorm_forward(ln1, NULL, NULL, res_in, P_(m, P, nm->ln1w), P_(m, P, nm->ln1b), BT, C);
        }
        qkv_backward(m, l, m->dln, m->dbig, ln1, BT, daux);
        prof_mark("layernorm bwd", 0.0);
        layernorm_backward(m->dres, P_(m, G, nm->ln1w), P_(m, G, nm->ln1b), m->dln, res_in, P_(m, P, nm->ln1w), ln1_mean, ln1_rstd, BT, C,
                           m->colsum_scratch);
        if (m->average_in_backward) grads_average_block(m, l);  // block l's gradients are final
    }
    // the batch's tokens bucketed for the encoder's backward: built on the host while the GPU works
    // through the backward queued above (not before the forward, where the GPU would wait for it),
    // and copied behind it from pinned memory, which does not wait for the queue
    prof_mark("encoder bwd (+ the host's token buckets)", 0.0);
    cudaCheck(cudaEventSynchronize(m->buckets_copied));  // the previous batch's copy has read h_buckets
    int used = encoder_buckets_build(m->h_buckets, m->h_count, m->h_inputs, BT, V);
    m->n_unique = m->h_buckets[0];
    cudaCheck(cudaMemcpyAsync(m->d_buckets, m->h_buckets, (size_t)used * sizeof(int), cudaMemcpyHostToDevice, 0));
    cudaCheck(cudaEventRecord(m->buckets_copied, 0));
    encoder_backward(P_(m, G, g->wte), P_(m, G, g->wpe), m->dres, m->d_buckets, m->n_unique, B, T, C);
    if (m->average_in_backward) grads_average_block(m, L);
    m->have_targets = 0;  // the logits and attention probabilities were consumed
    m->dlogits_ready = 0;
}

// With ZeRO-1 each rank holds the averaged gradients of its slice only: the squares are summed
// over slices, then over ranks.
static float gpt2_grad_norm(GPT2 *m) {
    if (!m->zero.stage) return global_norm(m->grads, m->num_params, m->norm_scratch);
    double sq = global_norm_squared(m->grads + m->zero.lo, m->zero.hi - m->zero.lo, m->norm_scratch);
    multiproc_sum_doubles(m->mp, &sq, 1);
    return (float)sqrt(sq);
}

// AdamW step t (1-based), as the CPU trainer's gpt2_update; grad_scale is the clipping factor.
// With ZeRO-1 only this rank's slice is updated, then the slices are gathered.
static void gpt2_update(GPT2 *m, float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale, long t) {
    adamw_plan_build(&m->adamw, &m->layout.params, &m->zero);  // once: the table and slice stay
    adamw_update_plan(&m->adamw, m->params, m->master, m->grads, m->m, m->v, lr, beta1, beta2, eps, weight_decay, grad_scale, t);
    if (m->zero.stage) multigpu_allgather(m->params, m->zero.shard, 0, m->mp->rank);
}

// ----------------------------------------------------------------------------------------------
// -at 1: each structured layer's kernels chosen by timing them here, on this GPU, at the run's own
// rows (structured/tune.cuh). A unit is what one choice is timed on, forward and backward with
// the trainer's own arguments: the BTT and Monarch layers among q, k and v of a block together
// (they run as one dense group when all three are dense, and their kernels decide the split
// copies), or one of attn_proj, fc, fc_proj, the head; BTT-MoE layers as units of their own (no
// dense choice), run the same way. Units of the same shapes share one timing and one choice.

typedef struct {
    int layer;  // -1: the head
    int role;   // SR_Q: q, k and v; SR_ATTN_PROJ, SR_FC, SR_FC_PROJ; SR_LM_HEAD
    int moe;    // its BTT-MoE layers, else its BTT and Monarch ones
    GPT2 *m;
} TuneUnit;

// The linear layers a unit sets the kernels of, into idx; returns how many.
static int tune_unit_members(const GPT2 *m, const TuneUnit *u, int idx[3]) {
    const GPT2Layout *g = &m->layout;
    int n = 0;
    for (int r = u->role; r <= (u->role == SR_Q ? SR_V : u->role); r++) {
        const LinearDesc *ld = u->layer < 0 ? &g->head : gpt2_linear((GPT2Layout *)g, u->layer, r);
        if (!ld->used || ld->fused_qkv || !st_kind_tunable(ld->spec.kind) || (ld->spec.kind == STRUCT_BTT_MOE) != u->moe) continue;
        idx[n++] = u->layer < 0 ? gpt2_num_linears(g) - 1 : u->layer * NUM_BLOCK_ROLES + r;
    }
    return n;
}

// The kind whose choices a unit tries: BTT-MoE's; else BTT's when it has a BTT layer (a Monarch
// one then runs -sk 2, 3 and 5 on the BTT kernels where they take its shape, else as 1), else
// Monarch's.
static int tune_unit_kind(const GPT2 *m, const TuneUnit *u) {
    if (u->moe) return STRUCT_BTT_MOE;
    int idx[3], kind = STRUCT_MONARCH;
    const int nm = tune_unit_members(m, u, idx);
    for (int i = 0; i < nm; i++)
        if (gpt2_linear_at(&m->layout, idx[i])->spec.kind == STRUCT_BTT) kind = STRUCT_BTT;
    return kind;
}

// A unit's alt for st_kernel_candidates: its BTT-MoE layers can group by set of experts (-mg 1 a
// candidate: their states have the set path, which -at 1 allocates wherever the shape takes it),
// or its Monarch layers run on the BTT kernels (-sk 2, 3 and 5 then differ from -sk 1).
static int tune_unit_alt(const GPT2 *m, const TuneUnit *u) {
    int idx[3];
    const int nm = tune_unit_members(m, u, idx);
    for (int i = 0; i < nm; i++) {
        const LinearSpec *spec = &gpt2_linear_at(&m->layout, idx[i])->spec;
        if (u->moe) {
            if (!m->lin[idx[i]].moe.sets) return 0;
        } else {
            if (spec->kind != STRUCT_MONARCH) return 0;
            const MonarchShape ms = monarch_shape_of(spec);
            if (!monarch_btt_candidate(&ms)) return 0;
        }
    }
    return nm > 0;
}
// "layer 3's fc (btt r1 768x3072)", "layer 0's q, k, v (...)" or "the head (...)": the unit as an
// error names it (the shape of its first member).
static void tune_unit_name(char *buf, size_t cap, const GPT2 *m, const TuneUnit *u) {
    int idx[3];
    char shape[96];
    tune_unit_members(m, u, idx);
    st_shape_name(shape, sizeof(shape), &gpt2_linear_at(&m->layout, idx[0])->spec);
    if (u->layer < 0) snprintf(buf, cap, "the head (%s)", shape);
    else snprintf(buf, cap, "layer %d's %s (%s)", u->layer, u->role == SR_Q ? "q, k, v" : struct_role_names[u->role], shape);
}

// Whether two units compute the same shapes the same way (then one timing serves both).
static int tune_units_alike(const GPT2 *m, const TuneUnit *a, const TuneUnit *b) {
    if (a->role != b->role || a->moe != b->moe || (a->layer < 0) != (b->layer < 0)) return 0;
    const GPT2Layout *g = &m->layout;
    for (int r = a->role; r <= (a->role == SR_Q ? SR_V : a->role); r++) {
        const LinearDesc *x = a->layer < 0 ? &g->head : gpt2_linear((GPT2Layout *)g, a->layer, r);
        const LinearDesc *y = b->layer < 0 ? &g->head : gpt2_linear((GPT2Layout *)g, b->layer, r);
        if (x->used != y->used || x->fused_qkv != y->fused_qkv || !st_same_shape(&x->spec, &y->spec)) return 0;
    }
    return 1;
}

// Unit u's forward, or its backward, as a training step runs it, on the step's buffers of its
// block; the gradients it accumulates are zeroed after the tuning.
static void tune_unit_pass(const TuneUnit *u, int bwd) {
    GPT2 *m = u->m;
    const GPT2Layout *g = &m->layout;
    Acts *a = &m->acts;
    const int N = m->B * m->T, l = u->layer < 0 ? 0 : u->layer;
    const size_t btc = (size_t)N * m->config.channels;
    floatX *ln1 = act_ln(m, a->ln1, l), *ln2 = act_ln(m, a->ln2, l), *fch = a->fch + (size_t)l * btc * 4;
    const LinearDesc *ld = u->layer < 0 ? &g->head : gpt2_linear((GPT2Layout *)g, l, u->role);
    if (!bwd) m->aux_next = 0;  // a BTT-MoE k or v beside a tuned q counts its aux slot again each run
    switch (u->role) {
        case SR_Q:
            if (!bwd) qkv_forward(m, l, a->qkv + (size_t)l * btc * 3, ln1, N);
            else qkv_backward(m, l, m->dln, m->dbig, ln1, N, 0.0f);
            break;
        case SR_ATTN_PROJ: {
            floatX *atty = a->atty + (size_t)l * btc;
            if (!bwd) linear_forward(m, ld, m->proj, atty, N, NULL);
            else linear_backward(m, ld, m->datty, m->dres, atty, N, NULL, 0.0f);
            break;
        }
        case SR_FC:
            if (!bwd) linear_forward(m, ld, act_gelu(m, l), ln2, N, fch);
            else linear_backward(m, ld, m->dln, m->dbig, ln2, N, NULL, 0.0f);
            break;
        case SR_FC_PROJ:
            if (!bwd) linear_forward(m, ld, m->proj, act_gelu(m, l), N, NULL);
            else linear_backward(m, ld, m->dbig, m->dres, act_gelu(m, l), N, fch, 0.0f);
            break;
        default:
            if (!bwd) linear_forward(m, ld, a->logits, a->lnf, N, NULL);
            else linear_backward(m, ld, m->dln, a->logits, a->lnf, N, NULL, 0.0f);
    }
}
static void tune_unit_forward(void *u) { tune_unit_pass((const TuneUnit *)u, 0); }
static void tune_unit_backward(void *u) { tune_unit_pass((const TuneUnit *)u, 1); }
// Both, as a training step (no backward with -x 0).
static void tune_unit_run(void *u) {
    tune_unit_forward(u);
    if (!((const TuneUnit *)u)->m->eval_only) tune_unit_backward(u);
}

// What unit u's run writes, as (pointer, rows, width) regions: its forward's output, its
// backward's input gradient (not with -x 0), its layers' gradients, then the state its layers
// save for the backward (z, u: `saved`), which a dense choice does not write.
// Checking that too is what lets -at 1 pair one choice's forward with another's backward: each
// backward was checked on z from its own forward, and each forward's z against the plans'.
typedef struct { const floatX *p; long rows; int w, stride, saved; } TuneRegion;
#define TUNE_MAX_REGIONS (2 + 3 * (LINEAR_MAX_TENSORS + 2))
static int tune_unit_regions(GPT2 *m, const TuneUnit *u, TuneRegion *r) {
    const int N = m->B * m->T, l = u->layer < 0 ? 0 : u->layer, C = m->config.channels;
    const size_t btc = (size_t)N * C;
    int n = 0;
    switch (u->role) {
        case SR_Q: r[n++] = {m->acts.qkv + (size_t)l * btc * 3, N, 3 * C, 0, 0}; r[n++] = {m->dln, N, C, 0, 0}; break;
        case SR_ATTN_PROJ: r[n++] = {m->proj, N, C, 0, 0}; r[n++] = {m->datty, N, C, 0, 0}; break;
        case SR_FC: r[n++] = {act_gelu(m, l), N, 4 * C, 0, 0}; r[n++] = {m->dln, N, C, 0, 0}; break;
        case SR_FC_PROJ: r[n++] = {m->proj, N, C, 0, 0}; r[n++] = {m->dbig, N, 4 * C, 0, 0}; break;
        default: r[n++] = {m->acts.logits, N, m->config.padded_vocab_size, 0, 0}; r[n++] = {m->dln, N, C, 0, 0};
    }
    if (m->eval_only) n--;
    for (int i = 0; i < n; i++) r[i].stride = st_sample_stride(r[i].rows, r[i].w);
    int idx[3];
    const int nm = tune_unit_members(m, u, idx);
    for (int i = 0; i < nm && m->grads; i++) {
        const LinearDesc *ld = gpt2_linear_at(&m->layout, idx[i]);
        for (int w = 0; w <= ld->nw; w++) {
            const int ti = w < ld->nw ? ld->w[w] : ld->bias;
            if (ti >= 0) r[n++] = {P_(m, m->grads, ti), (long)m->layout.params.t[ti].numel, 1, 1, 0};
        }
    }
    for (int i = 0; i < nm; i++) {
        const LinearSpec *s = &gpt2_linear_at(&m->layout, idx[i])->spec;
        const LinearState *ls = &m->lin[idx[i]];
        if (s->kind == STRUCT_BTT_MOE && ls->moe.z) {
            // its grouped rows in the tile slots a routing can fill (the padding ones zero both ways),
            // not the spare tile after them, whose products (of rows no gather wrote) nothing reads
            const MoEShape ms = moe_shape_of(s);
            const long rows = (long)moe_max_tiles(ls->moe.capacity * ms.topk, ms.experts, ls->moe.tile_rows) * ls->moe.tile_rows;
            const int w = (int)moe_z_row(&ms);
            r[n++] = {ls->moe.z, rows, w, st_sample_stride(rows, w), 1};
        } else if (ls->inter) {
            const int w = (int)st_inter_row(s);
            r[n++] = {ls->inter, N, w, st_sample_stride(N, w), 1};
        }
    }
    return n;
}

// The gradients of unit u's layers zeroed: each choice's runs accumulate from zero.
static void tune_unit_zero_grads(GPT2 *m, const TuneUnit *u) {
    TuneRegion r[TUNE_MAX_REGIONS];
    const int n = tune_unit_regions(m, u, r);
    for (int i = 0; i < n; i++)
        if (r[i].stride == 1 && r[i].w == 1) cudaCheck(cudaMemset((void *)r[i].p, 0, (size_t)r[i].rows * sizeof(floatX)));
}

// Stores unit u's results as the reference (store; *ref grown to fit), or compares them with it:
// the worst of its regions' max |a - ref| / max |ref| (st_sample); with own_state (a choice ran
// that saves no state, dense, or its own layout of it, -sk 4, which only its own backward reads)
// not the saved states.
static double tune_unit_check(GPT2 *m, const TuneUnit *u, int store, int own_state, floatX **ref, size_t *ref_cap, float *scratch) {
    TuneRegion r[TUNE_MAX_REGIONS];
    const int n = tune_unit_regions(m, u, r);
    size_t need = 0;
    for (int i = 0; i < n; i++) need += (size_t)st_sample_rows(r[i].rows, r[i].stride) * r[i].w;
    if (store && need > *ref_cap) {
        cuda_free_named(*ref, *ref_cap * sizeof(floatX));
        *ref = cudaMallocNamed(floatX, need, "scratch: -at 1's reference results (sampled rows, gradients)");
        *ref_cap = need;
    }
    double worst = 0.0;
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        const double d = own_state && r[i].saved ? 0.0 : st_sample(*ref + at, r[i].p, r[i].rows, r[i].w, r[i].stride, store, scratch);
        if (!(d <= worst)) worst = d;
        at += (size_t)st_sample_rows(r[i].rows, r[i].stride) * r[i].w;
    }
    return worst;
}

// The tests' stand-in for the clock: the milliseconds of unit u's forward and backward with
// kernels k into ms (NULL: time them).
static void (*g_tune_clock)(const GPT2 *m, const TuneUnit *u, int k, double ms[2]) = NULL;
#define TUNE_REPS 3

// The byte of each linear layer's kernels, into m->kernels (what a checkpoint's state keeps).
static void st_kernels_snapshot(GPT2 *m) {
    for (int i = 0; i < gpt2_num_linears(&m->layout); i++) {
        const LinearDesc *ld = gpt2_linear_at(&m->layout, i);
        const LinearState *ls = &m->lin[i];
        m->kernels[i] = ld->used && st_kind_tunable(ld->spec.kind) ? (uint8_t)lin_kernels(ls) : (uint8_t)ST_K_NONE;
    }
}

// Times every unit's candidate kernels, forward and backward apart, and sets each layer's to its
// unit's choice (tune.cuh's st_tune_pick_pair: the least total of forward + backward, among the
// candidates and the fastest forward with the fastest backward; the flags' choice unless another
// is faster by more than the margin), among those whose results agree with
// the cuBLAS plans' (tune.cuh's st_sample: forward output, input gradient, the layers' gradients
// and saved z; a choice that disagrees is never taken either way, and a warning names it). With
// several ranks the timings are summed over them first (a choice refused on one rank is refused
// on all), so that every rank chooses the same. Rank 0 prints the table. Needs the buffers
// st_buffers_fit(m, 1) allocated; leaves the gradients zero.
static void st_autotune(GPT2 *m) {
    const GPT2Layout *g = &m->layout;
    const int L = m->config.num_layers;
    m->B = m->max_B;
    m->T = m->max_T;
    TuneUnit *units = (TuneUnit *)mallocCheck(((size_t)L * 4 + 1) * 2 * sizeof(TuneUnit));
    int nu = 0;
    const int roles[4] = {SR_Q, SR_ATTN_PROJ, SR_FC, SR_FC_PROJ};
    for (int l = 0; l <= L; l++)
        for (int r = 0; r < (l < L ? 4 : 1); r++)
            for (int moe = 0; moe <= 1; moe++) {
                TuneUnit u = {l < L ? l : -1, l < L ? roles[r] : SR_LM_HEAD, moe, m};
                int idx[3];
                if (tune_unit_members(m, &u, idx)) units[nu++] = u;
            }
    if (!nu) {
        if (!m->mp || m->mp->rank == 0) printf("-at 1: no structured layers, nothing to time\n");
        free(units);
        return;
    }
    for (int u = 0; u < nu; u++) {  // -ax must leave the flags' own choice in: the untimed pass below and the other units' timings run it
        int idx[3];
        tune_unit_members(m, &units[u], idx);
        const int own = st_kernel_slot(st_kernel_canonical(tune_unit_kind(m, &units[u]), lin_kernels(&m->lin[idx[0]]), tune_unit_alt(m, &units[u])));
        if (own > 0 && (g_st_tune_skip & (1 << own))) {
            char unit[160];
            tune_unit_name(unit, sizeof(unit), m, &units[u]);
            fatal("-ax %s: %s is what the flags (-sk %d%s%s) run before and between -at 1's timings (%s); leave it out of -ax, or choose other "
                  "flags", g_st_tune_skip_list, st_kernel_tokens[own], g_st_sk, g_st_dense == 1 ? " -sm 1" : "", g_moe_sets == 1 ? " -mg 1" : "", unit);
        }
    }
    // rep[u]: the first unit alike; t[(u·ST_K_SLOTS + st_kernel_slot(k))·2 + d]: unit u's time with
    // candidate k, forward (d 0) and backward (d 1), timed for the reps only; diff[u·ST_K_SLOTS +
    // slot]: against the plans' results
    const size_t NT = (size_t)nu * ST_K_SLOTS;
    int *rep = (int *)mallocCheck((size_t)nu * sizeof(int)), *was = (int *)mallocCheck((size_t)nu * sizeof(int));
    double *t = (double *)callocCheck(NT * 2, sizeof(double)), *diff = (double *)callocCheck(NT, sizeof(double));
    g_oom_note = ST_TUNE_OOM_NOTE;
    float *cmp_scratch = cudaMallocNamed(float, 2 * ST_SAMPLE_BLOCKS, "scratch: -at 1's comparisons");
    floatX *ref = NULL;
    size_t ref_cap = 0;
    {  // inputs that look like training's: bf16 noise, not zeros or garbage
        const size_t BT = (size_t)m->B * m->T, C = m->config.channels, Lb = L ? L : 1;
        Acts *a = &m->acts;
        st_tune_fill(a->ln1, (m->recompute >= 2 ? 1 : Lb) * BT * C, 1);
        st_tune_fill(a->ln2, (m->recompute >= 2 ? 1 : Lb) * BT * C, 2);
        st_tune_fill(a->atty, Lb * BT * C, 3);
        st_tune_fill(a->fch, Lb * BT * 4 * C, 4);
        st_tune_fill(a->fch_gelu, (m->recompute >= 1 ? 1 : Lb) * BT * 4 * C, 5);
        st_tune_fill(a->lnf, BT * C, 6);
        st_tune_fill(m->dbig, BT * 4 * C, 7);
        st_tune_fill(m->dres, BT * C, 8);
        if (g->head.used && st_kind_tunable(g->head.spec.kind)) st_tune_fill(a->logits, BT * m->config.padded_vocab_size, 9);
        for (int u = 0; u < nu && !g_tune_clock; u++) tune_unit_run(&units[u]);  // untimed: the GPU up to its clocks before the first timing
    }
    for (int u = 0; u < nu; u++) {
        int idx[3], cand[ST_K_SLOTS];
        const int nm = tune_unit_members(m, &units[u], idx);
        was[u] = lin_kernels(&m->lin[idx[0]]);
        rep[u] = u;
        for (int v = 0; v < u && rep[u] == u; v++)
            if (rep[v] == v && tune_units_alike(m, &units[u], &units[v])) rep[u] = v;
        if (rep[u] != u) continue;
        const int nc = st_kernel_candidates(tune_unit_kind(m, &units[u]), cand, tune_unit_alt(m, &units[u]));
        int keep[3];
        for (int i = 0; i < nm; i++) keep[i] = lin_kernels(&m->lin[idx[i]]);
        char unit[160], label[48], ctx[320];
        tune_unit_name(unit, sizeof(unit), m, &units[u]);
        for (int c = 0; c < nc; c++) {  // cand[0] is -sk 0, the plans, for every kind: the reference
            const int slot = st_kernel_slot(cand[c]);
            const size_t at = (size_t)u * ST_K_SLOTS + slot;
            if (g_st_tune_skip & (1 << slot)) {  // -ax: never run
                t[at * 2] = t[at * 2 + 1] = ST_TUNE_LEFT_OUT;
                continue;
            }
            for (int i = 0; i < nm; i++) lin_set_kernels(&m->lin[idx[i]], cand[c]);
            tune_unit_zero_grads(m, &units[u]);
            // a kernel that fails here ends the run: its message says which, and how to leave it out
            st_kernel_label(label, sizeof(label), cand[c]);
            snprintf(ctx, sizeof(ctx), "-at 1 timed %s with %s; -ax %s leaves that choice out", unit, label, st_kernel_tokens[slot]);
            g_cuda_context = ctx;
            if (g_tune_clock) g_tune_clock(m, &units[u], cand[c], &t[at * 2]);
            else st_time_ms(tune_unit_forward, m->eval_only ? NULL : tune_unit_backward, &units[u], TUNE_REPS, &t[at * 2]);
            diff[at] = tune_unit_check(m, &units[u], c == 0, st_kernel_unpaired(cand[c]), &ref, &ref_cap, cmp_scratch);
            g_cuda_context = NULL;
        }
        for (int i = 0; i < nm; i++) lin_set_kernels(&m->lin[idx[i]], keep[i]);  // the flags' choice while the other units are timed
    }
    for (size_t i = 0; i < NT; i++)  // refused on this rank: on every rank, through the sum
        if (!(diff[i] <= ST_TUNE_AGREE)) t[2 * i] = t[2 * i + 1] = ST_TUNE_REFUSED;
    if (m->mp) {  // every rank then picks the same
        multiproc_sum_doubles(m->mp, t, (int)NT * 2);
        multiproc_sum_doubles(m->mp, diff, (int)NT);  // at least the worst rank's
    }
    int *pick = (int *)mallocCheck((size_t)nu * sizeof(int));
    for (int u = 0; u < nu; u++) {
        const int r = rep[u];
        if (r == u) {
            int cand[ST_K_SLOTS];
            const int kind = tune_unit_kind(m, &units[u]), nc = st_kernel_candidates(kind, cand, tune_unit_alt(m, &units[u]));
            double tf[ST_K_SLOTS], tb[ST_K_SLOTS];
            for (int c = 0; c < nc; c++) {
                tf[c] = t[((size_t)u * ST_K_SLOTS + st_kernel_slot(cand[c])) * 2];
                tb[c] = t[((size_t)u * ST_K_SLOTS + st_kernel_slot(cand[c])) * 2 + 1];
            }
            pick[u] = st_tune_pick_pair(cand, tf, tb, nc, st_kernel_canonical(kind, was[u], tune_unit_alt(m, &units[u])), !m->eval_only);
        } else {
            pick[u] = pick[r];
        }
        int idx[3];
        const int nm = tune_unit_members(m, &units[u], idx);
        for (int i = 0; i < nm; i++) lin_set_kernels(&m->lin[idx[i]], pick[u]);
    }
    if (!m->mp || m->mp->rank == 0) {
        printf("-at 1: each structured layer's kernels, %s at %d rows, ms (* chosen; the flags' kept within %.0f%%):\n",
               m->eval_only ? "forward (-x 0)" : "forward and backward", m->B * m->T, 100.0 * ST_TUNE_MARGIN);
        printf("  %-14s %-10s %-22s %-4s", "layers", "role", "structure", "pass");
        for (int k = 0; k < ST_K_SLOTS; k++) printf(" %9s", st_kernel_names[k]);
        printf("  chosen\n");
        int *on = (int *)mallocCheck((size_t)(L + 1) * sizeof(int));
        for (int u = 0; u < nu; u++) {
            if (rep[u] != u) continue;
            memset(on, 0, (size_t)(L + 1) * sizeof(int));
            for (int v = u; v < nu; v++)
                if (rep[v] == u && units[v].layer >= 0) on[units[v].layer] = 1;
            char layers[64], shape[96], chosen[48];
            if (units[u].layer < 0) snprintf(layers, sizeof(layers), "head");
            else st_layer_ranges(layers, sizeof(layers), on, L);
            int idx[3];
            const int nm = tune_unit_members(m, &units[u], idx);
            st_shape_name(shape, sizeof(shape), &gpt2_linear_at(g, idx[0])->spec);
            for (int i = 1; i < nm; i++) {  // q, k, v of other shapes: each named
                if (st_same_shape(&gpt2_linear_at(g, idx[0])->spec, &gpt2_linear_at(g, idx[i])->spec)) continue;
                shape[0] = '\0';
                for (int j = 0; j < nm; j++) {
                    const size_t at = strlen(shape);
                    st_shape_name(shape + at + (j ? 3 : 0), sizeof(shape) - at - (j ? 3 : 0), &gpt2_linear_at(g, idx[j])->spec);
                    if (j) memcpy(shape + at, " / ", 3);
                }
                break;
            }
            st_kernel_label(chosen, sizeof(chosen), pick[u]);
            const char *role = units[u].role == SR_Q ? "q, k, v" : struct_role_names[units[u].role];
            for (int d = 0; d < (m->eval_only ? 1 : 2); d++) {  // a line per pass, each marking its own kernels
                const int mine = st_kernel_slot(d ? st_kernel_bwd(pick[u]) : st_kernel_fwd(pick[u]));
                printf("  %-14s %-10s %-22s %-4s", d ? "" : layers, d ? "" : role, d ? "" : shape, d ? "bwd" : "fwd");
                for (int k = 0; k < ST_K_SLOTS; k++) {
                    const double v = t[((size_t)u * ST_K_SLOTS + k) * 2 + d];
                    if (v >= ST_TUNE_LEFT_OUT) printf(" %9s", "left out");
                    else if (v >= ST_TUNE_REFUSED) printf(" %9s", "refused");
                    else if (v > 0.0) printf(" %8.3f%s", v, k == mine ? "*" : " ");
                    else printf(" %9s", "-");
                }
                if (d) printf("\n");
                else printf("  %s\n", chosen);
            }
            for (int k = 0; k < ST_K_SLOTS; k++)
                if (t[((size_t)u * ST_K_SLOTS + k) * 2] >= ST_TUNE_REFUSED && t[((size_t)u * ST_K_SLOTS + k) * 2] < ST_TUNE_LEFT_OUT)
                    fprintf(stderr, "warning: -at 1: layers %s %s (%s): %s computes other results than the cuBLAS plans (-sk 0) on the "
                            "same inputs (max |difference| %.3g of the largest value, more than %g); it is not used. Please report this GPU "
                            "and config.\n",
                            layers, role, shape, st_kernel_names[k], diff[(size_t)u * ST_K_SLOTS + k], ST_TUNE_AGREE);
        }
        free(on);
    }
    cuda_free_named(cmp_scratch, 2 * ST_SAMPLE_BLOCKS * sizeof(float));
    cuda_free_named(ref, ref_cap * sizeof(floatX));
    g_oom_note = NULL;
    free(units); free(rep); free(t); free(diff); free(was); free(pick);
    m->aux_next = 0;
    if (m->grads) gpt2_zero_grad(m);
    cudaCheck(cudaDeviceSynchronize());
}

// ----------------------------------------------------------------------------------------------
// Checkpoints, as llm.c's GPU trainer: the model file is version 5, the bf16 weights exactly as
// the GPU holds them (loads in llm.c's train_gpt2cu, in train_gpt2 on the CPU, and here), and
// each rank's resume state (common/checkpoint.h) adds the fp32 master weights to the step, data
// position, RNG and AdamW moments, so that a resumed run continues bit for bit. A structured
// model has no bf16 format: its model file is version 10 from the fp32 master weights (which the
// state then need not repeat), as the CPU trainer writes it.

// All of the fp32 master weights to the host (with ZeRO-1, gathered from the ranks first); with
// -w 0 the bf16 weights, which every rank holds whole after each update, widened.
static void gpt2_download_master(GPT2 *m) {
    if (m->no_master) {
        uint16_t *hb = (uint16_t *)mallocCheck(m->num_params * sizeof(uint16_t));
        cudaCheck(cudaMemcpy(hb, m->params, m->num_params * sizeof(uint16_t), cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < m->num_params; i++) m->master_host[i] = bf16_to_float(hb[i]);
        free(hb);
        return;
    }
    if (m->zero.stage) multigpu_allgather(m->master, m->zero.shard, 1, m->mp->rank);
    cudaCheck(cudaMemcpy(m->master_host, m->master, m->num_params * sizeof(float), cudaMemcpyDeviceToHost));
}

// The data of checkpoint f (its paths and TrainState filled by the driver), from the GPU into w's
// snapshot buffers: a bf16 model file as the GPU holds the weights (a structured one fp32, from
// the master weights); the state holds this rank's moments (its slice with -z 1) and, for bf16
// model files, the matching slice of the master weights (with -w 0 the model file holds the exact
// weights). Every rank calls it (with ZeRO-1 the master weights are gathered first).
static void gpt2_checkpoint_snapshot(GPT2 *m, CkptFiles *f, CkptWriter *w) {
    size_t n = m->num_params, nm = gpt2_moments_len(m), lo = m->zero.stage ? m->zero.lo : 0;
    if (m->config_text) gpt2_download_master(m);
    f->config = m->config;
    f->config_text = m->config_text;
    f->n_model = n;
    f->model = NULL;
    if (f->model_path[0] && m->config_text) {
        f->model_version = MODEL_VERSION_STRUCT_FP32;
        f->model = memcpy(ckpt_buffer(w, CKPT_BUF_MODEL, n * sizeof(float)), m->master_host, n * sizeof(float));
    } else if (f->model_path[0]) {
        f->model_version = MODEL_VERSION_BF16;
        f->model = ckpt_buffer(w, CKPT_BUF_MODEL, n * sizeof(uint16_t));
        cudaCheck(cudaMemcpy((void *)f->model, m->params, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    }
    float *hm = (float *)ckpt_buffer(w, CKPT_BUF_M, nm * sizeof(float)), *hv = (float *)ckpt_buffer(w, CKPT_BUF_V, nm * sizeof(float));
    cudaCheck(cudaMemcpy(hm, m->m, nm * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(hv, m->v, nm * sizeof(float), cudaMemcpyDeviceToHost));
    f->m = hm;
    f->v = hv;
    f->master = NULL;
    if (!m->config_text && !m->no_master) {  // this rank's slice [lo, lo + nm), the padded tail of the last one included
        float *hmaster = (float *)ckpt_buffer(w, CKPT_BUF_MASTER, nm * sizeof(float));
        cudaCheck(cudaMemcpy(hmaster, m->master + lo, nm * sizeof(float), cudaMemcpyDeviceToHost));
        f->master = hmaster;
    }
    f->st.num_params = (int64_t)nm;
    st_kernels_snapshot(m);
    f->kernels = m->kernels;
    f->n_kernels = gpt2_num_linears(&m->layout);
}

// The kernels a resume state kept (one byte per linear layer), checked against this model. With
// -at 1 they become the layers' own, not timed again, so that the run continues bit for bit; else
// the flags rule, and a note says where they differ.
static void st_kernels_restore(GPT2 *m, const uint8_t *kern, const char *path) {
    const int n = gpt2_num_linears(&m->layout);
    int differ = 0;
    st_kernels_snapshot(m);
    for (int i = 0; i < n; i++) {
        const LinearDesc *ld = gpt2_linear_at(&m->layout, i);
        const int kind = ld->used ? (int)ld->spec.kind : STRUCT_DENSE;
        int sets = 0;
        if (kind == STRUCT_BTT_MOE) {
            const MoEShape ms = moe_shape_of(&ld->spec);
            sets = moe_set_count(&ms) > 0;
        }
        if (!st_kernel_valid(kind, kern[i], sets))
            fatal("'%s': linear layer %d (%s) has kernels %d, which a %s layer%s cannot run; the file is corrupt, or from another model",
                  path, i, ld->layer < 0 ? "lm_head" : struct_role_names[ld->role], kern[i], struct_names[kind],
                  kind == STRUCT_BTT_MOE && st_kernel_by_set(kern[i]) ? " of this shape (no grouping by set: it needs top 2, 4 or 8 and at most "
                                                                  "1024 sets)" : "");
        differ += kern[i] != m->kernels[i];
    }
    if (!g_st_tune) {
        if (differ && (!m->mp || m->mp->rank == 0))
            printf("note: %d structured layers ran other kernels before this resume (-at 1 chose them); resume with -at 1 to run the "
                   "same and continue bit for bit\n", differ);
        return;
    }
    for (int i = 0; i < n; i++) {
        if (kern[i] == ST_K_NONE) continue;
        lin_set_kernels(&m->lin[i], kern[i]);
    }
    m->kernels_restored = 1;
}

// After gpt2_build(checkpoint) and gpt2_alloc: the moments and master weights from the state
// file, and the bf16 weights exactly as the uninterrupted run had them after update st->step. A
// state without master weights (its model file was fp32, or written with -w 0) keeps the model
// file's weights. Either -w resumes either kind: stochastic rounding leaves a value that bf16
// holds exactly as it is, so a -w 0 run's weights come back bit for bit both ways.
static void gpt2_read_state(GPT2 *m, const char *state_path, TrainState *st) {
    size_t nm = gpt2_moments_len(m), lo = m->zero.stage ? m->zero.lo : 0;
    float *hm = (float *)mallocCheck(nm * sizeof(float)), *hv = (float *)mallocCheck(nm * sizeof(float));
    const int nl = gpt2_num_linears(&m->layout);
    uint8_t *kern = (uint8_t *)mallocCheck((size_t)nl);
    int had_master = state_read(state_path, st, hm, hv, m->master_host + lo, nm, kern, nl);
    if (st->n_kernels) st_kernels_restore(m, kern, state_path);
    free(kern);
    if (!m->eval_only) {
        cudaCheck(cudaMemcpy(m->m, hm, nm * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(m->v, hv, nm * sizeof(float), cudaMemcpyHostToDevice));
    }
    free(hm);
    free(hv);
    if (m->master && had_master) {  // this rank's slice came from the state: gather the others'
        cudaCheck(cudaMemcpy(m->master + lo, m->master_host + lo, nm * sizeof(float), cudaMemcpyHostToDevice));
        if (m->zero.stage) multigpu_allgather(m->master, m->zero.shard, 1, m->mp->rank);
        master_to_bf16(&m->layout.params, m->params, m->master, (long)st->step);
    } else {  // master_host is whole: the model file's weights, this rank's slice from the state
        gpt2_upload_weights(m, (long)st->step);
    }
}

// ----------------------------------------------------------------------------------------------
// Sampling (as the CPU trainer: forward over the prefix, softmax of the last row on the host)

static void gpt2_sample(GPT2 *m, const Tokenizer *tok, int eot, int gen_T, uint64_t *rng) {
    const GPT2Config *c = &m->config;
    int T = gen_T + 1 < m->max_T ? gen_T + 1 : m->max_T;
    int *tokens = (int *)mallocCheck((size_t)T * sizeof(int));
    float *probs = (float *)mallocCheck((size_t)c->vocab_size * sizeof(float));
    uint16_t *row = (uint16_t *)mallocCheck((size_t)c->padded_vocab_size * sizeof(uint16_t));
    tokens[0] = eot;
    printf("generating:\n---\n");
    for (int t = 1; t < T; t++) {
        gpt2_forward(m, tokens, NULL, 1, t);
        cudaCheck(cudaMemcpy(row, m->acts.logits + (size_t)(t - 1) * c->padded_vocab_size, (size_t)c->padded_vocab_size * sizeof(uint16_t),
                             cudaMemcpyDeviceToHost));
        for (int i = 0; i < c->vocab_size; i++) probs[i] = bf16_to_float(row[i]);
        tokens[t] = sample_softmax(probs, c->vocab_size, rng);
        print_token(tok, tokens[t]);
    }
    printf("\n---\n");
    free(tokens);
    free(probs);
    free(row);
}

// ----------------------------------------------------------------------------------------------
// Training: the shared driver (common/train_main.h) with the GPU's hooks

#include "common/multiproc.h"

static int g_recompute = 1;  // -r, llm.c's default
// -fa: cuDNN's attention where the build has it (measured on an H200, dev/bench/RESULTS.md: GPT-2
// 124M steps 1.48x faster than with our flash kernel, whose backward runs at ~76 TFLOP/s), else ours
#ifdef USE_CUDNN
static int g_flash = 2;
#else
static int g_flash = 1;
#endif
static int g_log_gpu = 0;    // -lg: a GPU state line every this many steps
static int g_master_weights = 1;  // -w, llm.c's default
static GpuMonitor g_monitor;
static void gpu_monitor_close_global(void) { gpu_monitor_close(&g_monitor); }
#ifdef USE_CUDNN
#define ATTN_CUDNN_BUILD "in this build"
#else
#define ATTN_CUDNN_BUILD "not in this build: needs the cuDNN frontend headers"
#endif

// -ax LIST: the choices -at 1 leaves out (tune.cuh's tokens), only with -at 1. (That it leaves
// in what the flags run each layer is st_autotune's check, on the layers' own kernels.)
static void st_tune_skip_set(const char *list) {
    char err[256];
    const int mask = st_tune_skip_parse(list, err, sizeof(err));
    if (mask < 0) fatal("-ax %s: %s", list, err);
    if (!g_st_tune) fatal("-ax %s: -ax leaves choices out of -at 1's timing; add -at 1, or drop -ax", list);
    g_st_tune_skip = mask;
    g_st_tune_skip_list = list;
}

// The GPU trainer's own flags, taken out of argv before the shared parser sees the rest: a table
// (flag, what it sets, range, help), as common/args.h does for the shared ones.
typedef struct {
    const char *flag;
    int *ival;            // integer flags
    const char **sval;    // string flags
    int lo, hi;
    const char *help;
} GpuFlag;

static void trainer_setup(int *argc, char **argv, MultiProc *mp) {
    int gelu_fusion = -1;  // -1: by device (2 on sm_90+, else 0)
    const char *tune_skip = NULL;  // -ax
    LaunchArgs la = {0, 0, 8, NULL, NULL};
    const GpuFlag flags[] = {
        {"-r", &g_recompute, NULL, 0, 2, "recompute in the backward to save memory: 0 none, 1 GELU, 2 GELU and LayerNorm (default: 1)"},
        {"-ge", &gelu_fusion, NULL, 0, 2, "GELU fused into cuBLASLt epilogues: 0 none, 1 forward, 2 forward and backward (default: 2 on sm_90+, else 0)"},
        {"-fa", &g_flash, NULL, 0, 2, "attention: 1 our flash kernel (no T x T buffer; head sizes 16/32/64/128; deterministic), "
                                      "2 cuDNN's fused flash attention (" ATTN_CUDNN_BUILD "), 0 cuBLAS + softmax (default: 2 in a cuDNN build, else 1)"},
        {"-w", &g_master_weights, NULL, 0, 1, "1: fp32 master weights for AdamW; 0: none, AdamW updates the bf16 weights with stochastic "
                                              "rounding (4 bytes per parameter less; llm.c's -w) (default: 1)"},
        {"-lg", &g_log_gpu, NULL, -1, 1 << 30, "every this many steps, a line of the GPU's utilisation, SM clock, power, temperature, memory "
                                              "and clock-limit reasons (NVML, from the driver; 0 or -1: off) (default: 0)"},
        {"-sk", &g_st_sk, NULL, 0, 5, "structured kernels: 0 cuBLAS baseline, 1 fused where the shape allows (BTT fwd + bwd dx, BTT-MoE experts, Monarch fwd + bwd dx), "
                                    "2 the same with the BTT kernel's W0 staged in shared memory (and Monarch layers whose blocks divide q on that kernel, "
                                    "as the BTT they are), 3 as 2 but BTT split: the kernel's first stage "
                                    "(z, and dZ from dy) and cuBLAS for the rest, 4 the baseline with z (u) stored transposed, which takes no "
                                    "permute of it, 5 as 2 with the BTT kernel on raw mma.sync (W1 packed in fragment order) "
                                    "(2 to 5 not yet measured on a GPU) (default: 0)"},
        {"-sm", &g_st_dense, NULL, 0, 2, "1: BTT and Monarch layers run as dense GEMMs on their weight matrix, materialized from the cores at every use "
                                        "(a dense layer's time; for widths where the structure is slower than dense); 2: only the layers a model of "
                                        "this GPU's GEMM rate and memory traffic (structured/exec_model.h) finds faster that way (default: 0)"},
        {"-mg", &g_moe_sets, NULL, 0, 2, "BTT-MoE: 0 tokens grouped by expert (k rows a token); 1 grouped by their set of experts (top 2, 4 or 8, "
                                         "at most 1024 sets): one row a token through the set's rank-k BTT, x and dy read and y written once, on "
                                         "the cuBLAS plans with -sk 0, else (-sk 1, 2, 3, 5) forward and backward dx each one launch of that fused "
                                         "kernel over the sets, the gates applied between its stages (-sk 4 groups by expert); 2: by set in the "
                                         "layers a model of this GPU's rates for the plans (structured/exec_model.h) finds faster so at this run's "
                                         "rows (not yet measured on a GPU). -at 1 times the grouping by set, on the plans and fused, as choices "
                                         "of each layer; -mg then says only which choice it keeps within its margin (default: 0)"},
        {"-at", &g_st_tune, NULL, 0, 1, "1: time each structured layer's kernels (-sk 0..5; BTT and Monarch also -sm's dense GEMMs, BTT-MoE -mg 1's "
                                       "grouping by set, on the plans and on -sk 1, 2, 5's fused kernels) at startup, forward and backward apart at this run's rows, and run each layer the fastest (the fastest forward may pair with "
                                       "another's backward); -sk, -sm and -mg's choice is kept unless another is 3% faster; a resumed run "
                                       "takes the state's kernels (default: 0)"},
        {"-ax", NULL, &tune_skip, 0, 0, "with -at 1: choices it leaves out, comma-separated: sk1 sk2 sk3 dense sk4 mg1 sk5 mg1sk1 mg1sk2 mg1sk5 "
                                         "(a kernel that fails on this GPU: the error names the choice it was timing) (default: none)"},
        {"-pn", &la.pn, NULL, 1, 1 << 20, "processes, when started without mpirun (-pi fs|tcp)"},
        {"-pr", &la.pr, NULL, 0, 1 << 20, "this process's rank, without mpirun"},
        {"-pg", &la.pg, NULL, 1, 1024, "GPUs per node, without mpirun: the GPU is rank % this (default: 8)"},
        {"-pi", NULL, &la.pi, 0, 0, "init method: mpi (default under mpirun), fs (shared directory -pf) or tcp (-pf HOST:PORT of rank 0)"},
        {"-pf", NULL, &la.pf, 0, 0, "fs: a directory every process can read and write; tcp: HOST:PORT where rank 0 listens"},
    };
    const int nflags = (int)(sizeof(flags) / sizeof(flags[0]));
    int n = 1;
    for (int i = 1; i < *argc; i++) {
        if (train_args_wants_help(*argc, argv, i)) {
            train_args_usage(argv[0], stdout);
            printf("GPU trainer only:\n");
            for (int f = 0; f < nflags; f++) printf("  %-4s %-6s %s\n", flags[f].flag, flags[f].ival ? "<int>" : "<str>", flags[f].help);
            printf("  multi-GPU: mpirun -np N ./train_gpt2cu ...; -z 1 shards the optimizer state (ZeRO-1)\n");
            exit(EXIT_SUCCESS);
        }
        const GpuFlag *g = NULL;
        for (int f = 0; f < nflags; f++)
            if (strcmp(argv[i], flags[f].flag) == 0) g = &flags[f];
        if (!g) { argv[n++] = argv[i]; continue; }
        if (i + 1 >= *argc) fatal("flag %s needs a value (%s)", argv[i], g->help);
        const char *val = argv[++i];
        if (g->sval) { *g->sval = val; continue; }
        char *end;
        long v = strtol(val, &end, 10);
        if (*end != '\0' || end == val || v < g->lo || v > g->hi) fatal("flag %s: '%s' must be an integer in [%d, %d] (%s)", g->flag, val, g->lo, g->hi, g->help);
        *g->ival = (int)v;
    }
    argv[n] = NULL;
    *argc = n;
    if (tune_skip) st_tune_skip_set(tune_skip);
    multigpu_init(mp, &la, 0);  // picks this rank's GPU (gpu_init), then NCCL when there are several ranks
    if (g_mgpu.active) atexit(multigpu_finalize);
    if (gelu_fusion >= 0) g_gpu.gelu_fusion = gelu_fusion;
    st_set_kernels(g_st_sk);
    if (g_log_gpu > 0 && mp->rank == 0) {  // only rank 0 prints
        char bus[32], err[512];
        snprintf(bus, sizeof(bus), "%08X:%02X:%02X.0", (unsigned)g_gpu.prop.pciDomainID, (unsigned)g_gpu.prop.pciBusID, (unsigned)g_gpu.prop.pciDeviceID);
        if (gpu_monitor_open(&g_monitor, bus, err, sizeof(err)) != 0) fatal("-lg %d: %s; run without -lg", g_log_gpu, err);
        atexit(gpu_monitor_close_global);
    }
}

static void trainer_alloc(GPT2 *m, const MultiProc *mp, int B, int T, int zero_stage, int train) {
    m->mp = mp;
    zero_shard_init(&m->zero, zero_stage, m->num_params, mp->rank, mp->nproc);
    m->no_master = !g_master_weights || !train;
    m->eval_only = !train;
    gpt2_alloc(m, B, T, g_recompute, g_flash);
    // the gradient ranges of each block, averaged as soon as its backward is done
    if (train && g_mgpu.active) m->grad_first = gpt2_block_ranges(&m->layout, &m->grad_ranges);
    if (g_flash && !m->flash && !m->cudnn)
        printf("note: head size %d is not one the flash kernel handles (16, 32, 64, 128): attention runs on cuBLAS + softmax\n",
               m->config.channels / m->config.num_heads);
}
static void trainer_sync(void) { cudaCheck(cudaDeviceSynchronize()); }
static double trainer_peak_flops(void) { return gpu_peak_bf16_tflops(g_gpu.prop.name) * 1e12; }
static int trainer_n_routed(const GPT2 *m) { return m->n_routed; }
static const float *trainer_row_losses(const GPT2 *m) { return m->h_losses + m->aux_slots; }
// -pt 1's clock: an event on the stream at each mark, created as the marks first need them (a step
// of GPT-2 124M has about 200), so that a part is the GPU's time from its mark to the next one's.
static cudaEvent_t *g_prof_events;
static int g_prof_n_events;
static void prof_event_record(int i) {
    if (i >= g_prof_n_events) {
        int n = i + 1 > 2 * g_prof_n_events ? i + 1 : 2 * g_prof_n_events;
        g_prof_events = (cudaEvent_t *)reallocCheck(g_prof_events, (size_t)n * sizeof(cudaEvent_t));
        for (int k = g_prof_n_events; k < n; k++) cudaCheck(cudaEventCreate(&g_prof_events[k]));
        g_prof_n_events = n;
    }
    cudaCheck(cudaEventRecord(g_prof_events[i], 0));
}
static double prof_event_elapsed(int i, int j) {
    float ms = 0.0f;
    cudaCheck(cudaEventSynchronize(g_prof_events[j]));
    cudaCheck(cudaEventElapsedTime(&ms, g_prof_events[i], g_prof_events[j]));
    return ms;
}
static void prof_events_free(void) {
    for (int k = 0; k < g_prof_n_events; k++) cudaCheck(cudaEventDestroy(g_prof_events[k]));
    free(g_prof_events);
    g_prof_events = NULL;
    g_prof_n_events = 0;
}
// Without a profiler attached these do nothing; an error (profiling disabled) is cleared, so that
// the next launch's check does not take it for its own, and only noted: -pt's table does not need it.
static void prof_capture(int on) {
    cudaError_t e = on ? cudaProfilerStart() : cudaProfilerStop();
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        fprintf(stderr, "note: %s: %s (an external profiler's range is not marked)\n", on ? "cudaProfilerStart" : "cudaProfilerStop",
                cudaGetErrorString(e));
    }
}
static void trainer_profile_start(void) {
    prof_enable(prof_event_record, prof_event_elapsed, prof_events_free, prof_capture);
}

static void trainer_step_end(GPT2 *m, long step) {
    if (g_log_gpu <= 0 || step % g_log_gpu != 0 || m->mp->rank != 0) return;
    char line[512];
    gpu_monitor_line(&g_monitor, line, sizeof(line));
    printf("%s\n", line);
}

// -at 1's choices per role: "-sk 3" when all its BTT/Monarch layers run the same, else each
// choice with its count ("-sk 0 x4, dense x8"; a pair "-sk 3 fwd, -sk 0 bwd").
static void trainer_banner_kernels(const GPT2 *m) {
    for (int r = 0; r <= NUM_BLOCK_ROLES; r++) {
        int count[ST_K_END] = {0}, any = 0;
        for (int i = 0; i < gpt2_num_linears(&m->layout); i++) {
            const LinearDesc *ld = gpt2_linear_at(&m->layout, i);
            if ((ld->layer < 0 ? NUM_BLOCK_ROLES : ld->role) != r || !ld->used || !st_kind_tunable(ld->spec.kind)) continue;
            count[lin_kernels(&m->lin[i])]++;
            any = 1;
        }
        if (!any) continue;
        char line[256] = "", label[32], name[48];
        int kinds = 0;
        for (int k = 0; k < ST_K_END; k++) kinds += count[k] > 0;
        for (int k = 0; k < ST_K_END; k++) {
            if (!count[k]) continue;
            const size_t at = strlen(line);
            st_kernel_label(name, sizeof(name), k);
            if (kinds == 1) snprintf(line + at, sizeof(line) - at, "%s", name);
            else snprintf(line + at, sizeof(line) - at, "%s%s x%d", at ? ", " : "", name, count[k]);
        }
        snprintf(label, sizeof(label), "-at 1: %s", r < NUM_BLOCK_ROLES ? struct_role_names[r] : "lm_head");
        printf("| %-21s | %-50s |\n", label, line);
    }
}

static void trainer_banner(const GPT2 *m) {
    double peak = trainer_peak_flops();
    char peak_str[64];
    if (peak > 0) snprintf(peak_str, sizeof(peak_str), "%.0f TFLOP/s", peak / 1e12);
    else snprintf(peak_str, sizeof(peak_str), "unknown for this device: no MFU printed");
    printf("| device                | %-50.50s |\n", g_gpu.prop.name);
    printf("| peak bf16 (dense)     | %-50s |\n", peak_str);
    printf("| precision             | %-50s |\n", m->eval_only   ? "bf16 weights/acts; no gradients or AdamW (-x 0)"
                                                   : m->no_master ? "bf16 weights/acts, no master weights (-w 0), fp32 AdamW"
                                                                  : "bf16 weights/acts, fp32 master+AdamW+LN stats+loss");
    printf("| recompute / gelu fuse | -r %d / -ge %-40d |\n", g_recompute, g_gpu.gelu_fusion);
    printf("| attention             | %-50s |\n", m->cudnn   ? "cuDNN fused flash attention (-fa 2)"
                                                   : m->flash ? "flash (ours: cuda/flash_attention.cuh)"
                                                              : "cuBLAS batched GEMMs + causal softmax (ours)");
    if (m->layout.structure.any_structured) {
        // per role (the head last): its BTT/Monarch layers, and how many of them run as dense
        char how[64], roles[128] = "";
        int n_dense = 0, n_dm = 0;
        for (int r = 0; r <= NUM_BLOCK_ROLES; r++) {
            int d = 0, t = 0;
            for (int i = 0; i < gpt2_num_linears(&m->layout); i++) {
                const LinearDesc *ld = gpt2_linear_at(&m->layout, i);
                if ((ld->layer < 0 ? NUM_BLOCK_ROLES : ld->role) != r || !ld->used) continue;
                if (ld->spec.kind != STRUCT_BTT && ld->spec.kind != STRUCT_MONARCH) continue;
                t++;
                d += m->lin[i].as_dense;
            }
            n_dm += t;
            n_dense += d;
            if (!d) continue;  // "role" when all its layers run as dense, "role d/t" when some do
            const char *name = r < NUM_BLOCK_ROLES ? struct_role_names[r] : "lm_head";
            const size_t at = strlen(roles);
            if (d == t) snprintf(roles + at, sizeof(roles) - at, "%s%s", at ? ", " : "", name);
            else snprintf(roles + at, sizeof(roles) - at, "%s%s %d/%d", at ? ", " : "", name, d, t);
        }
        if (g_st_tune) snprintf(how, sizeof(how), "per layer, timed (-at 1)");
        else if (g_st_dense == 2) snprintf(how, sizeof(how), "-sm 2: %d of %d BTT/Monarch as dense, rest -sk %d", n_dense, n_dm, g_st_sk);
        else if (g_st_dense == 1) snprintf(how, sizeof(how), "dense BTT, Monarch (-sm 1); BTT-MoE %s", g_st_fused ? "fused" : g_st_zt ? "-sk 4" : "-sk 0");
        else if (g_st_sk == 5) snprintf(how, sizeof(how), "fused BTT (W0 staged, mma.sync), Monarch fwd+bwd dx (-sk 5)");
        else if (g_st_sk == 4) snprintf(how, sizeof(how), "cuBLAS baseline, z and u transposed (-sk 4)");
        else if (g_st_sk == 3) snprintf(how, sizeof(how), "BTT split (stage 1 fused), Monarch fused (-sk 3)");
        else if (g_st_sk == 2) snprintf(how, sizeof(how), "fused BTT (W0 staged), Monarch fwd+bwd dx (-sk 2)");
        else snprintf(how, sizeof(how), "%s", g_st_sk ? "fused BTT, Monarch fwd+bwd dx (-sk 1)" : "cuBLAS strided-batched baseline (-sk 0)");
        printf("| structured layers     | %-50s |\n", how);
        if (!g_st_tune && !g_st_dense && g_btt_wstage) {  // -sk 2, 3, 5: the Monarch layers that run as a BTT on its kernels
            int n_mon = 0, n_btt = 0;
            for (int i = 0; i < gpt2_num_linears(&m->layout); i++) {
                const LinearDesc *ld = gpt2_linear_at(&m->layout, i);
                if (!ld->used || ld->spec.kind != STRUCT_MONARCH) continue;
                const MonarchShape ms = monarch_shape_of(&ld->spec);
                BTTShape bs;
                n_mon++;
                n_btt += monarch_btt_pays(&bs, &ms, 0);
            }
            if (n_mon) {
                snprintf(how, sizeof(how), "%d of %d layers on the BTT kernels (forward)", n_btt, n_mon);
                printf("| Monarch as BTT        | %-50s |\n", how);
            }
        }
        if (g_moe_sets || (g_st_tune && m->n_routed)) {  // how many BTT-MoE layers group their tokens by set of experts
            int n_moe = 0, n_sets = 0;
            for (int i = 0; i < gpt2_num_linears(&m->layout); i++) {
                const LinearDesc *ld = gpt2_linear_at(&m->layout, i);
                if (!ld->used || ld->spec.kind != STRUCT_BTT_MOE) continue;
                n_moe++;
                n_sets += st_kernel_by_set(lin_kernels(&m->lin[i]));
            }
            char mg[96];
            if (g_st_tune) snprintf(mg, sizeof(mg), "by set of experts in %d of %d layers (-at 1)", n_sets, n_moe);
            else if (g_st_sk == 4) snprintf(mg, sizeof(mg), "by expert: -sk 4's layout has no grouping by set");
            else if (g_st_sk) snprintf(mg, sizeof(mg), "by set of experts in %d of %d (-mg %d, fused -sk %d)", n_sets, n_moe, g_moe_sets, g_st_sk);
            else snprintf(mg, sizeof(mg), "by set of experts in %d of %d layers (-mg %d)", n_sets, n_moe, g_moe_sets);
            printf("| BTT-MoE grouping      | %-50s |\n", mg);
        }
        if (g_st_dense == 2 && !g_st_tune) printf("| -sm 2 runs as dense   | %-50s |\n", roles[0] ? roles : "none");
        if (g_st_tune) trainer_banner_kernels(m);
    }
    size_t bytes = g_gpu_bytes;
#ifdef USE_CUDNN
    bytes += cudnn_attention_workspace_bytes();  // cuDNN allocates it, not cudaMallocNamed
#endif
    char mem[64];
    snprintf(mem, sizeof(mem), "%.2f GiB (%.1f MiB)", bytes / 1073741824.0, bytes / 1048576.0);
    printf("| GPU memory allocated  | %-50s |\n", mem);
}

static void trainer_moe_fhat(GPT2 *m, const LinearDesc *ld, float *fhat) {
    cudaCheck(cudaMemcpy(fhat, lin_state(m, ld)->moe.fhat, (size_t)ld->spec.experts * sizeof(float), cudaMemcpyDeviceToHost));
}

// Slot micro of h_step_losses (aux_slots + max_B x max_T floats each). The buffer grows in the
// first step only, keeping the slots already copied.
static float *step_loss_slot(GPT2 *m, int micro) {
    const size_t per = (size_t)m->aux_slots + (size_t)m->max_B * m->max_T;
    if (micro >= m->step_slots) {
        float *grown;
        cudaCheck(cudaMallocHost((void **)&grown, (size_t)(micro + 1) * per * sizeof(float)));
        if (m->h_step_losses) {
            cudaCheck(cudaEventSynchronize(m->losses_copied));  // the copies into the old slots are done
            memcpy(grown, m->h_step_losses, (size_t)m->step_slots * per * sizeof(float));
            cudaCheck(cudaFreeHost(m->h_step_losses));
        } else {
            cudaCheck(cudaEventCreateWithFlags(&m->losses_copied, cudaEventDisableTiming));
        }
        m->h_step_losses = grown;
        m->step_slots = micro + 1;
    }
    return m->h_step_losses + (size_t)micro * per;
}

// Queues the micro-batch's forward, backward and the copy of its losses; nothing waits for the
// GPU here (trainer_step_losses does, once per step), so the host queues the next micro-batch
// while the GPU works through this one.
static void trainer_micro_step(GPT2 *m, const int *inputs, const int *targets, int B, int T, float dloss_scale, int micro, int last) {
    m->sync_aux = 1;  // every rank runs this, so BTT-MoE layers may sum their statistics over ranks
    gpt2_forward_launch(m, inputs, targets, B, T, dloss_scale / (B * T));
    m->sync_aux = 0;
    m->average_in_backward = last && g_mgpu.active;
    gpt2_backward(m, dloss_scale);
    m->average_in_backward = 0;
    float *slot = step_loss_slot(m, micro);
    cudaCheck(cudaMemcpyAsync(slot, m->d_aux, (size_t)(m->aux_slots + B * T) * sizeof(float), cudaMemcpyDeviceToHost, 0));
    cudaCheck(cudaEventRecord(m->losses_copied, 0));
}

static void trainer_step_losses(GPT2 *m, int n, float *loss, MoERouting *routing) {
    if (n > m->step_slots) fatal("internal: %d micro-batches' losses asked for, %d slots", n, m->step_slots);
    prof_mark("losses to the host, summed (GPU idle)", 0.0);
    multigpu_wait("the step's forward and backward");  // a rank that died in a collective: an error, not a hang
    cudaCheck(cudaEventSynchronize(m->losses_copied));
    for (int k = 0; k < n; k++) loss[k] = gpt2_losses_fold(m, step_loss_slot(m, k), m->B * m->T, &routing[k]);
    m->routing = routing[n - 1];
}

// The average over ranks (with ZeRO-1, of this rank's slice), which the last micro-step's backward
// started block by block: waits for it.
static void trainer_mean_grads(GPT2 *m, const MultiProc *mp) {
    if (!g_mgpu.active) return;
    if (!m->grads_averaging) fatal("internal: the gradients' averaging was not started in the last micro-step (%d ranks)", mp->nproc);
    multigpu_grads_join();
    m->grads_averaging = 0;
}

static void trainer_checkpoint_snapshot(GPT2 *m, CkptFiles *f, CkptWriter *w, int may_borrow) {
    (void)may_borrow;  // the GPU's data goes to host memory either way
    gpt2_checkpoint_snapshot(m, f, w);
}
static void trainer_read_state(GPT2 *m, const char *state_path, TrainState *st) { gpt2_read_state(m, state_path, st); }
// -at 1: the kernels of each layer, timed (or, resumed, those of the state), then the buffers sized for them.
static void trainer_prepare(GPT2 *m) {
    if (!g_st_tune) return;
    if (!m->kernels_restored) st_autotune(m);
    else if (m->mp->rank == 0) printf("-at 1: each structured layer runs the kernels the resume state kept (not timed again)\n");
    st_buffers_fit(m, 0);
}

#ifndef TESTING
#include "common/train_main.h"
#endif
