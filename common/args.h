// args.h: the trainers' command line: llm.c's flags (same letters, same meanings) described as a
// table, so that parsing, defaults and --help come from one place for the CPU and GPU trainers.
#pragma once
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "utils.h"

// -na's default: 0 in the CPU trainer, where a writer thread would slow every OpenMP thread more
// than the write costs; train_gpt2.cu defines it 1 (its host thread mostly waits for the GPU)
#ifndef CKPT_ASYNC_DEFAULT
#define CKPT_ASYNC_DEFAULT 0
#endif

typedef struct {
    const char *train_data;   // -i
    const char *val_data;     // -j
    const char *model;        // -e
    const char *out_dir;      // -o
    const char *tokenizer;    // -tk
    const char *eval_path;    // -hf
    const char *lr_schedule;  // -k
    int B, T;                 // -b -t
    int total_batch;          // -d
    float lr;                 // -l
    int warmup;               // -u
    float final_frac;         // -q
    float weight_decay;       // -c
    float grad_clip;          // -gc
    float skip_loss_z;        // -sl
    float skip_norm_z;        // -sg
    int val_every;            // -v
    int val_max_steps;        // -m
    int hellaswag;            // -h
    int sample_every;         // -s
    int gen_T;                // -g
    int max_steps;            // -x
    int overfit;              // -a
    int ckpt_every;           // -n
    int keep_last;            // -nk
    int major_every;          // -nm
    int ckpt_async;           // -na
    int resume;               // -y
    int seed;                 // -sd
    int shuffle;              // -sh
    int zero_stage;           // -z
    int routing_loads;        // -rl
    int profile;              // -pt
} TrainArgs;

typedef enum { ARG_STR, ARG_INT, ARG_FLOAT } ArgType;
typedef struct {
    const char *flag;
    ArgType type;
    size_t offset;
    const char *help;
} ArgSpec;

#define ARG_FIELD(f) offsetof(TrainArgs, f)
static const ArgSpec train_arg_specs[] = {
    {"-i", ARG_STR, ARG_FIELD(train_data), "train data shards (file or glob pattern)"},
    {"-j", ARG_STR, ARG_FIELD(val_data), "val data shards (file or glob pattern)"},
    {"-e", ARG_STR, ARG_FIELD(model), "model: llm.c checkpoint .bin, dN (fresh GPT-2 of depth N, seed 42), or a config file"},
    {"-o", ARG_STR, ARG_FIELD(out_dir), "output dir for main.log, checkpoints and resume state (none: nothing written)"},
    {"-tk", ARG_STR, ARG_FIELD(tokenizer), "tokenizer .bin for sampling (default: gpt2_tokenizer.bin beside the train data)"},
    {"-k", ARG_STR, ARG_FIELD(lr_schedule), "learning-rate schedule: cosine, linear, constant, wsd"},
    {"-b", ARG_INT, ARG_FIELD(B), "micro batch size B (sequences per forward pass, per process)"},
    {"-t", ARG_INT, ARG_FIELD(T), "sequence length T"},
    {"-d", ARG_INT, ARG_FIELD(total_batch), "total batch size in tokens (-1: B*T*processes; larger: gradient accumulation)"},
    {"-l", ARG_FLOAT, ARG_FIELD(lr), "peak learning rate"},
    {"-u", ARG_INT, ARG_FIELD(warmup), "learning-rate warmup steps"},
    {"-q", ARG_FLOAT, ARG_FIELD(final_frac), "final learning rate as a fraction of the peak"},
    {"-c", ARG_FLOAT, ARG_FIELD(weight_decay), "AdamW weight decay (applied to >= 2-D weights only)"},
    {"-gc", ARG_FLOAT, ARG_FIELD(grad_clip), "clip the global gradient norm to this (0: off)"},
    {"-sl", ARG_FLOAT, ARG_FIELD(skip_loss_z), "skip the update when the loss is this many std devs above the last 100 steps' mean (0: off)"},
    {"-sg", ARG_FLOAT, ARG_FIELD(skip_norm_z), "skip the update when the gradient norm is this many std devs above the last 100 steps' (0: off)"},
    {"-v", ARG_INT, ARG_FIELD(val_every), "val loss every this many steps (0: never)"},
    {"-m", ARG_INT, ARG_FIELD(val_max_steps), "val batches per evaluation (-1: the whole val set)"},
    {"-h", ARG_INT, ARG_FIELD(hellaswag), "1: HellaSwag accuracy (of -hf) at every val step and the last (-h alone: this help)"},
    {"-hf", ARG_STR, ARG_FIELD(eval_path), "multiple-choice eval file for -h 1 (python data/hellaswag.py writes it)"},
    {"-s", ARG_INT, ARG_FIELD(sample_every), "sample text every this many steps (0: never)"},
    {"-g", ARG_INT, ARG_FIELD(gen_T), "tokens to generate when sampling"},
    {"-x", ARG_INT, ARG_FIELD(max_steps), "optimizer steps to train (-1: one epoch of the train data; 0: only evaluate the model: val loss, -h 1, a sample)"},
    {"-a", ARG_INT, ARG_FIELD(overfit), "1: train on the first batch only (overfit a single batch)"},
    {"-n", ARG_INT, ARG_FIELD(ckpt_every), "write a checkpoint + resume state every this many steps (0: never; needs -o)"},
    {"-nk", ARG_INT, ARG_FIELD(keep_last), "keep only the last this many checkpoints (0: keep all)"},
    {"-nm", ARG_INT, ARG_FIELD(major_every), "with -nk: also keep every checkpoint whose step is a multiple of this (0: none)"},
    {"-na", ARG_INT, ARG_FIELD(ckpt_async), "1: checkpoints are written by a background thread from a copy in host memory while training goes on "
                                            "(as much host memory again as the files; the GPU trainer's default); 0: training waits for the writes"},
    {"-y", ARG_INT, ARG_FIELD(resume), "1: resume from the latest checkpoint in -o"},
    {"-sd", ARG_INT, ARG_FIELD(seed), "seed of the train data order (with -sh 1)"},
    {"-sh", ARG_INT, ARG_FIELD(shuffle), "1: shuffle shard and batch order each epoch"},
    {"-z", ARG_INT, ARG_FIELD(zero_stage), "ZeRO stage: 0 off, 1 shard the optimizer state over the processes"},
    {"-rl", ARG_INT, ARG_FIELD(routing_loads), "1: at every val step, each BTT-MoE layer's expert loads in the last training batch"},
    {"-pt", ARG_INT, ARG_FIELD(profile), "1: at the end, a table of where the steps' time went (each layer kind's forward and backward, "
                                         "the optimizer, the data; the steps run a little slower); 2: also the steps inside each "
                                         "structured layer (packed weights, row tiles or each plan op, BTT-MoE's routing and gathers...)"},
};
#define NUM_TRAIN_ARGS (sizeof(train_arg_specs) / sizeof(train_arg_specs[0]))

static inline void train_args_defaults(TrainArgs *a) {
    memset(a, 0, sizeof(*a));
    a->train_data = "data/tinyshakespeare/tiny_shakespeare_train.bin";
    a->val_data = "data/tinyshakespeare/tiny_shakespeare_val.bin";
    a->model = "gpt2_124M.bin";
    a->out_dir = NULL;
    a->tokenizer = NULL;
    a->eval_path = "data/hellaswag/hellaswag_val.bin";
    a->lr_schedule = "cosine";
    a->B = 4;
    a->T = 64;
    a->total_batch = -1;
    a->lr = 3e-4f;
    a->warmup = 0;
    a->final_frac = 1.0f;
    a->weight_decay = 0.0f;
    a->grad_clip = 1.0f;
    a->val_every = 20;
    a->val_max_steps = 20;
    a->sample_every = 20;
    a->gen_T = 64;
    a->max_steps = -1;
    a->overfit = 0;
    a->ckpt_every = 0;
    a->keep_last = 0;
    a->ckpt_async = CKPT_ASYNC_DEFAULT;
    a->resume = 0;
    a->seed = 42;
    a->shuffle = 0;
}

static inline void train_args_value_str(const TrainArgs *a, const ArgSpec *s, char *buf, size_t cap) {
    const char *base = (const char *)a + s->offset;
    if (s->type == ARG_STR) {
        const char *v = *(const char *const *)base;
        snprintf(buf, cap, "%s", v ? v : "(none)");
    } else if (s->type == ARG_INT) {
        snprintf(buf, cap, "%d", *(const int *)base);
    } else {
        snprintf(buf, cap, "%g", *(const float *)base);
    }
}

static inline void train_args_usage(const char *prog, FILE *out) {
    TrainArgs d;
    train_args_defaults(&d);
    fprintf(out, "usage: %s [flags]   (flags follow llm.c's train_gpt2.cu)\n", prog);
    for (size_t i = 0; i < NUM_TRAIN_ARGS; i++) {
        char def[256];
        train_args_value_str(&d, &train_arg_specs[i], def, sizeof(def));
        fprintf(out, "  %-4s %-6s %s (default: %s)\n", train_arg_specs[i].flag,
                train_arg_specs[i].type == ARG_STR ? "<str>" : train_arg_specs[i].type == ARG_INT ? "<int>" : "<float>",
                train_arg_specs[i].help, def);
    }
    fprintf(out, "  --help      print this and exit (so does -h without a value)\n");
    fprintf(out, "SIGTERM, SIGUSR1 or Ctrl-C: finish the step, write a checkpoint into -o, exit 128 + the signal;\n"
                 "the same command with -y 1 carries on bit for bit (a second Ctrl-C stops at once)\n");
}

// Whether argv[i] asks for the help: --help, or -h without a number after it (with one, -h is
// llm.c's HellaSwag flag).
static inline int train_args_wants_help(int argc, char **argv, int i) {
    if (strcmp(argv[i], "--help") == 0) return 1;
    if (strcmp(argv[i], "-h") != 0) return 0;
    const char *next = i + 1 < argc ? argv[i + 1] : "";
    return !next[0] || strspn(next, "-0123456789") != strlen(next);
}

static inline void train_args_parse(TrainArgs *a, int argc, char **argv) {
    train_args_defaults(a);
    for (int i = 1; i < argc; i++) {
        if (train_args_wants_help(argc, argv, i)) {
            train_args_usage(argv[0], stdout);
            exit(EXIT_SUCCESS);
        }
        const ArgSpec *s = NULL;
        for (size_t k = 0; k < NUM_TRAIN_ARGS; k++)
            if (strcmp(argv[i], train_arg_specs[k].flag) == 0) s = &train_arg_specs[k];
        if (!s) {
            train_args_usage(argv[0], stderr);
            fatal("unknown flag '%s' (see the list above)", argv[i]);
        }
        if (i + 1 >= argc) fatal("flag %s needs a value (%s)", argv[i], s->help);
        const char *val = argv[++i];
        char *base = (char *)a + s->offset;
        char *end;
        errno = 0;
        if (s->type == ARG_STR) {
            *(const char **)base = val;
        } else if (s->type == ARG_INT) {
            long v = strtol(val, &end, 10);
            if (errno || *end != '\0' || end == val || v < -2147483647L || v > 2147483647L)
                fatal("flag %s: '%s' is not an integer (%s)", s->flag, val, s->help);
            *(int *)base = (int)v;
        } else {
            float v = strtof(val, &end);
            if (errno || *end != '\0' || end == val || v != v) fatal("flag %s: '%s' is not a number (%s)", s->flag, val, s->help);
            *(float *)base = v;
        }
    }
    if (a->B < 1) fatal("-b %d: the batch size must be >= 1", a->B);
    if (a->T < 1) fatal("-t %d: the sequence length must be >= 1", a->T);
    if (a->lr < 0) fatal("-l %g: the learning rate must be >= 0", a->lr);
    if (a->final_frac < 0 || a->final_frac > 1) fatal("-q %g: the final lr fraction must be in [0, 1]", a->final_frac);
    if (a->warmup < 0) fatal("-u %d: warmup steps must be >= 0", a->warmup);
    if (a->weight_decay < 0) fatal("-c %g: weight decay must be >= 0", a->weight_decay);
    if (a->grad_clip < 0) fatal("-gc %g: the gradient clip must be >= 0", a->grad_clip);
    if (a->skip_loss_z < 0 || a->skip_norm_z < 0)
        fatal("-sl %g -sg %g: the outlier thresholds are z-scores > 0 (3 is usual), or 0 for off", a->skip_loss_z, a->skip_norm_z);
    if (a->gen_T < 1) fatal("-g %d: must generate at least one token", a->gen_T);
    if (a->max_steps < -1) fatal("-x %d: give a number of steps >= 1, 0 to only evaluate, or -1 for one epoch", a->max_steps);
    if (a->ckpt_every < 0 || a->keep_last < 0 || a->major_every < 0 || a->val_every < 0 || a->sample_every < 0)
        fatal("-n, -nk, -nm, -v and -s take values >= 0");
    if (a->hellaswag != 0 && a->hellaswag != 1) fatal("-h %d: 1 evaluates HellaSwag at every val step, 0 does not", a->hellaswag);
    if (a->routing_loads != 0 && a->routing_loads != 1) fatal("-rl %d: 1 prints each BTT-MoE layer's expert loads at every val step, 0 does not", a->routing_loads);
    if (a->profile < 0 || a->profile > 2)
        fatal("-pt %d: 1 prints where the steps' time went at the end, 2 also the steps inside the structured layers, 0 neither", a->profile);
    if (a->ckpt_async != 0 && a->ckpt_async != 1) fatal("-na %d: 1 writes checkpoints in the background, 0 waits for them", a->ckpt_async);
    if (a->zero_stage != 0 && a->zero_stage != 1) fatal("-z %d: the ZeRO stage must be 0 (off) or 1 (optimizer state sharded)", a->zero_stage);
    if (a->resume && !a->out_dir) fatal("-y 1 resumes from the checkpoints in -o; give -o <dir>");
    if (a->ckpt_every > 0 && !a->out_dir) fatal("-n %d writes checkpoints into -o; give -o <dir>", a->ckpt_every);
}
