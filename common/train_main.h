// train_main.h: the training driver shared by the CPU and GPU trainers: flags, model, data,
// schedule, resume, validation, sampling, checkpoints, logging and the step loop. Each trainer
// defines its model (a GPT2 type and the gpt2_* functions below) and these hooks, then includes
// this file once:
//   gpt2_build(m, spec)  gpt2_forward(m, in, tgt, B, T) -> loss  gpt2_zero_grad(m)  gpt2_grad_norm(m)
//   gpt2_update(m, lr, beta1, beta2, eps, wd, grad_scale, t)  gpt2_sample(m, tok, eot, gen_T, rng)
//   gpt2_free(m)
//   trainer_setup(&argc, argv, &mp)     its own flags and device, before the shared flags are parsed
//                                       (the GPU trainer also sets up NCCL and mp's collectives)
//   trainer_alloc(m, mp, B, T, zero, train)   activations and optimizer buffers, for this rank of mp
//                                       (zero: -z, 1 = this rank keeps only its ZeRO-1 slice;
//                                       train 0: -x 0, no gradients or optimizer state needed)
//   trainer_micro_step(m, in, tgt, B, T, dloss_scale, micro, last)   forward and backward of the
//                                       step's micro-batch number micro (gradients accumulate; last:
//                                       the step's last, whose backward the GPU trainer overlaps with
//                                       the averaging of the finished blocks' gradients)
//   trainer_step_losses(m, n, loss, routing)   the mean losses of the step's n micro-batches and
//                                       their BTT-MoE aux loss and routing over the global batch
//                                       (routing.h), once they are all queued: the GPU trainer waits
//                                       here, once per step, not after each micro-batch
//   trainer_mean_grads(m, mp)           average the gradients over the data-parallel ranks (or
//                                       finish the averaging the last micro-step started)
//   trainer_checkpoint_snapshot(m, f, w, may_borrow)   the model file (when f->model_path is set)
//                                       and the state's arrays (this rank's slice with -z 1) of
//                                       checkpoint f into w's host buffers (ckpt_writer.h), or with
//                                       may_borrow (written at once) the model's own host memory
//   trainer_read_state(m, path, st)
//   trainer_prepare(m)                  after the resume state, before the banner (the GPU trainer's
//                                       -at 1 times each structured layer's kernels here)
//   trainer_banner(m)  trainer_peak_flops() (0: unknown)  trainer_sync()  trainer_n_routed(m)
//   trainer_row_losses(m)               the (B, T) per-position losses of the last gpt2_forward
//                                       with targets, on the host (-h 1's scoring)
//   trainer_step_end(m, step)           after step's line is printed (the GPU trainer's -lg line)
//   trainer_moe_fhat(m, ld, fhat)       BTT-MoE layer ld's f̂ (E floats: each expert's share of the
//                                       top-k selections) of the last forward, on the host (-rl 1)
//   trainer_profile_start()             -pt: prof_enable with the trainer's clock (step_profile.h)
#pragma once
#include <math.h>
#include "args.h"
#include "checkpoint.h"
#include "ckpt_writer.h"
#include "dataloader.h"
#include "evalloader.h"
#include "gpt2.h"
#include "logger.h"
#include "multiproc.h"
#include "outlier.h"
#include "schedule.h"
#include "step_profile.h"
#include "../structured/step_hook.h"
#include "stop.h"
#include "tokenizer.h"
#include "utils.h"

static float val_loss(GPT2 *m, DataLoader *dl, int max_steps, int B, int T) {
    dataloader_reset(dl);
    long n = dataloader_num_batches(dl);
    if (max_steps >= 0 && max_steps < n) n = max_steps;
    double sum = 0.0;
    for (long i = 0; i < n; i++) {
        dataloader_next_batch(dl);
        sum += gpt2_forward(m, dl->inputs, dl->targets, B, T);
    }
    return (float)(sum / (n > 0 ? n : 1));
}

// -rl 1: every BTT-MoE layer's expert loads (f̂·E) of the last forward, which was a training
// micro-batch (f̂ global over the ranks), one line per layer.
static void print_routing_loads(GPT2 *m, long step) {
    const GPT2Layout *g = &m->layout;
    const int L = g->config.num_layers;
    printf("expert loads after step %ld (each expert's share of the top-k selections x E; 1 = even, 0 = unused):\n", step);
    for (int i = 0; i <= L * NUM_BLOCK_ROLES; i++) {
        const LinearDesc *ld = i < L * NUM_BLOCK_ROLES ? gpt2_linear(g, i / NUM_BLOCK_ROLES, i % NUM_BLOCK_ROLES) : &g->head;
        if (!ld->used || ld->spec.kind != STRUCT_BTT_MOE) continue;
        const int E = ld->spec.experts;
        float fhat[STRUCT_MAX_EXPERTS];
        trainer_moe_fhat(m, ld, fhat);
        char name[32];
        linear_layer_name(ld, name, sizeof(name));
        int unused = 0;
        printf("  %-14s", name);
        for (int e = 0; e < E; e++) {
            printf(" %4.2f", E * fhat[e]);
            unused += fhat[e] == 0.0f;
        }
        printf(unused ? "  (%d unused)\n" : "\n", unused);
    }
}

// HellaSwag accuracy (-h 1): each rank scores batches first = (b * nproc + rank) * per_batch, the
// counts are summed over the ranks.
static float eval_accuracy(GPT2 *m, EvalLoader *e, const MultiProc *mp) {
    double right = 0.0;
    for (int first = mp->rank * e->per_batch; first < e->n; first += e->per_batch * mp->nproc) {
        int count = e->n - first < e->per_batch ? e->n - first : e->per_batch;
        evalloader_fill(e, first, count);
        gpt2_forward(m, e->inputs, e->targets, e->B, e->T);
        right += evalloader_correct(e, trainer_row_losses(m), first, count);
    }
    multiproc_sum_doubles(mp, &right, 1);
    printf("HellaSwag: %.0f/%d = %f\n", right, e->n, right / e->n);
    return (float)(right / e->n);
}

// argv as one line a shell reads back to the same words: an argument with anything but
// [A-Za-z0-9_./:=,+@%-] in it is single-quoted (a ' inside as '\'').
static char *command_line(int argc, char **argv) {
    size_t cap = 1;
    for (int i = 0; i < argc; i++) cap += 4 * strlen(argv[i]) + 3;
    char *out = (char *)mallocCheck(cap), *w = out;
    for (int i = 0; i < argc; i++) {
        const char *s = argv[i];
        int plain = s[0] != '\0';
        for (const char *p = s; *p; p++)
            if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./:=,+@%-", *p)) plain = 0;
        if (i > 0) *w++ = ' ';
        if (plain) { w += sprintf(w, "%s", s); continue; }
        *w++ = '\'';
        for (const char *p = s; *p; p++) w += *p == '\'' ? sprintf(w, "'\\''") : sprintf(w, "%c", *p);
        *w++ = '\'';
    }
    *w = '\0';
    return out;
}

// run.txt in -o: what the run is, for scripts/compare_runs.py (which puts runs side by side by
// tokens, training FLOPs or time) and for whoever finds the folder later. One block per start,
// so a resume appends one; "key = value" lines, the last of a key counts.
static void write_run_info(Logger *l, const char *command, const char *model, long start_step, long steps, const GPT2 *m,
                           double flops_per_token, const TrainArgs *a, int nproc, int grad_accum) {
    char when[64] = "?", text[8192];
    time_t now = time(NULL);
    struct tm tm;
    if (gmtime_r(&now, &tm)) strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    const GPT2Config *c = &m->config;
    snprintf(text, sizeof(text),
             "# started %s at step %ld\n"
             "command = %.4000s\n"
             "model = %.1000s\n"
             "layers = %d\nheads = %d\nchannels = %d\nvocab_size = %d\n"
             "parameters = %zu\n"
             "flops_per_token = %.0f\n"  // training (forward + backward), as the MFU counts them
             "tokens_per_step = %d\n"
             "B = %d\nT = %d\ngrad_accum = %d\nprocesses = %d\nzero = %d\n"
             "steps = %ld\n"
             "lr = %g\nschedule = %s\nwarmup = %d\nfinal_lr_frac = %g\nweight_decay = %g\n",
             when, start_step, command, model, c->num_layers, c->num_heads, c->channels, c->vocab_size,
             gpt2_num_params_unpadded(&m->layout), flops_per_token, a->total_batch, a->B, a->T, grad_accum,
             nproc, a->zero_stage && nproc > 1, steps, a->lr, a->lr_schedule, a->warmup, a->final_frac, a->weight_decay);
    logger_append_run_info(l, text);
}

// Removes the checkpoint of `step`: the DONE marker first, so that a half-deleted checkpoint is never
// "latest"; rank 0 its marker and model, every rank its state.
static void remove_checkpoint(const TrainArgs *a, const MultiProc *mp, long step) {
    char model_path[1100], state_path[1100], done_path[1100];
    checkpoint_paths(a->out_dir, step, mp->rank, model_path, state_path, done_path, sizeof(model_path));
    if (mp->rank == 0) {
        remove(done_path);
        remove(model_path);
    }
    remove(state_path);
}

// The checkpoint being written: -na 1 writes each rank's files on a background thread; the
// checkpoint counts once rank 0 has written its DONE marker, after every rank's files are in
// place, so that a crash mid-checkpoint leaves the previous one as the latest.
typedef struct {
    CkptWriter w;
    int pending;      // written or being written, no DONE marker yet
    long step, stale;
} Checkpoints;

// The DONE marker of the pending checkpoint and -nk's deletions. all_done: a collective has just
// shown that every rank's files are in place; else this waits for this rank's and meets the others.
static void checkpoint_finish(Checkpoints *ck, const TrainArgs *a, const MultiProc *mp, int all_done) {
    if (!ck->pending) return;
    ckpt_writer_join(&ck->w);
    if (!all_done) multiproc_barrier(mp);
    ck->pending = 0;
    char model_path[1100], state_path[1100], done_path[1100];
    checkpoint_paths(a->out_dir, ck->step, mp->rank, model_path, state_path, done_path, sizeof(model_path));
    if (mp->rank == 0) {
        FILE *fp = fopenCheck(done_path, "w");
        fcloseCheck(fp, done_path);
    }
    printf("wrote checkpoint %s and %s\n", model_path, state_path);
    // -nk: the checkpoint that falls out of the last keep_last goes, unless -nm marks it major (only
    // on the -n grid: a stop's checkpoint off it removes none, and goes itself once a newer one is in)
    long step = ck->step, stale = ck->stale, old = step - (long)a->keep_last * a->ckpt_every;
    if (a->keep_last > 0 && a->ckpt_every > 0 && step % a->ckpt_every == 0 && old > 0 && !(a->major_every > 0 && old % a->major_every == 0))
        remove_checkpoint(a, mp, old);
    if (stale > 0 && stale != step && !(a->major_every > 0 && stale % a->major_every == 0)) remove_checkpoint(a, mp, stale);
    if (!all_done) multiproc_barrier(mp);
}

// Rank 0 writes the model, every rank its own state: with -na 1 from a snapshot on a background
// thread (checkpoint_finish follows when every rank is done: at a later step, or at the end),
// with -na 0 at once. stale: with -nk, an earlier checkpoint off the -n grid (a signal's stop,
// which this run resumed from) that this newer one replaces, or -1.
static void save_checkpoint(Checkpoints *ck, GPT2 *m, const TrainArgs *a, const MultiProc *mp, DataLoader *train, long step,
                            uint64_t sample_rng, const OutlierWindow *loss_window, const OutlierWindow *norm_window, long stale) {
    checkpoint_finish(ck, a, mp, 0);  // the previous one first
    char model_path[1100], state_path[1100], done_path[1100];
    checkpoint_paths(a->out_dir, step, mp->rank, model_path, state_path, done_path, sizeof(model_path));
    CkptFiles *f = &ck->w.files;
    memset(f, 0, sizeof(*f));
    if (mp->rank == 0) snprintf(f->model_path, sizeof(f->model_path), "%s", model_path);
    snprintf(f->state_path, sizeof(f->state_path), "%s", state_path);
    TrainState *st = &f->st;
    st->step = step;
    st->num_params = (int64_t)m->num_params;
    st->rank = mp->rank;
    st->nproc = mp->nproc;
    st->B = a->B;
    st->T = a->T;
    st->total_batch_size = a->total_batch;
    st->zero_stage = a->zero_stage && mp->nproc > 1;
    DataLoaderState ds = dataloader_get_state(train);
    st->dl_epoch = ds.epoch;
    st->dl_shard_idx = ds.shard_idx;
    st->dl_sample_idx = ds.sample_idx;
    st->sample_rng = sample_rng;
    st->loss_window = *loss_window;
    st->norm_window = *norm_window;
    trainer_checkpoint_snapshot(m, f, &ck->w, !a->ckpt_async);
    ck->pending = 1;
    ck->step = step;
    ck->stale = stale;
    if (a->ckpt_async) {
        ckpt_writer_start(&ck->w);
    } else {
        ckpt_files_write(f);
        checkpoint_finish(ck, a, mp, 0);
    }
}

int main(int argc, char **argv) {
    MultiProc mp;
    multiproc_init(&mp, &argc, &argv);
    char *command = command_line(argc, argv);  // before trainer_setup takes its own flags out
    trainer_setup(&argc, argv, &mp);
    TrainArgs a;
    train_args_parse(&a, argc, argv);
    LRScheduleType sched_type;
    if (!lr_schedule_type_from_name(a.lr_schedule, &sched_type))
        fatal("-k '%s': unknown learning-rate schedule; use cosine, linear, constant or wsd", a.lr_schedule);

    // resume: the model comes from the latest checkpoint instead of -e
    long resume_step = -1;
    char resume_model[1100], resume_state[1100], resume_done[1100];
    if (a.resume) {
        resume_step = find_latest_checkpoint(a.out_dir);
        if (resume_step < 0) {
            printf("-y 1: no checkpoint in '%s' yet, starting from -e %s\n", a.out_dir, a.model);
        } else {
            checkpoint_paths(a.out_dir, resume_step, mp.rank, resume_model, resume_state, resume_done, sizeof(resume_model));
        }
    }
    GPT2 model;
    gpt2_build(&model, resume_step >= 0 ? resume_model : a.model);
    const GPT2Config *c = &model.config;
    if (a.T > c->max_seq_len) fatal("-t %d is longer than the model's max_seq_len %d; use -t <= %d", a.T, c->max_seq_len, c->max_seq_len);

    int nproc = mp.nproc, rank = mp.rank;
    if (rank != 0) {  // one voice: only rank 0 prints progress (errors still come from any rank)
        if (!freopen("/dev/null", "w", stdout)) fatal("rank %d: cannot silence stdout", rank);
    }
    int tokens_per_micro = a.B * a.T * nproc;
    if (a.total_batch == -1) a.total_batch = tokens_per_micro;
    if (a.total_batch <= 0 || a.total_batch % tokens_per_micro != 0)
        fatal("-d %d must be a positive multiple of B*T*processes = %d*%d*%d = %d", a.total_batch, a.B, a.T, nproc, tokens_per_micro);
    int grad_accum = a.total_batch / tokens_per_micro;

    DataLoader train_loader, val_loader;
    // -x 0 only evaluates: it needs no training data (e.g. a model scored on WikiText alone)
    const int have_train = a.max_steps != 0 || dataloader_pattern_matches(a.train_data);
    if (have_train) dataloader_init(&train_loader, a.train_data, a.B, a.T, rank, nproc, a.shuffle, (unsigned long long)a.seed);
    else memset(&train_loader, 0, sizeof(train_loader));
    int have_val = a.val_every > 0 && a.val_data && a.val_data[0];
    train_loader.vocab_size = c->vocab_size;
    if (have_val) {
        dataloader_init(&val_loader, a.val_data, a.B, a.T, rank, nproc, 0, 0);
        val_loader.vocab_size = c->vocab_size;
    }
    long train_steps = a.max_steps >= 0 ? a.max_steps : train_loader.num_tokens_total / a.total_batch;
    if (train_steps < 1 && a.max_steps != 0) fatal("'%s' holds fewer tokens than one step of -d %d; use a smaller batch or more data", a.train_data, a.total_batch);

    trainer_alloc(&model, &mp, a.B, a.T, a.zero_stage, a.max_steps != 0);
    if (a.max_steps != 0) gpt2_zero_grad(&model);

    EvalLoader eval_loader;
    int have_eval = a.hellaswag && a.val_every > 0;
    if (a.hellaswag && !have_eval) fatal("-h 1 evaluates at every val step; give -v > 0 (now -v 0)");
    if (have_eval) {
        evalloader_init(&eval_loader, a.eval_path, a.B, a.T, c->vocab_size);
        printf("HellaSwag: %d examples from %s, %d per batch of %d rows of %d tokens\n", eval_loader.n, a.eval_path, eval_loader.per_batch,
               a.B, eval_loader.T);
        if (eval_loader.truncated_rows > 0)
            printf("note: %ld of its rows are longer than -t %d + 1 tokens and lose their first context tokens\n", eval_loader.truncated_rows, a.T);
    }

    Tokenizer tokenizer;
    char tok_path[1100];
    if (a.tokenizer) snprintf(tok_path, sizeof(tok_path), "%s", a.tokenizer);
    else default_tokenizer_path(have_train || !have_val ? a.train_data : a.val_data, c->vocab_size, tok_path, sizeof(tok_path));
    tokenizer_init(&tokenizer, tok_path);
    int eot = tokenizer.init_ok ? tokenizer.eot_token : 50256;
    if (eot >= c->vocab_size) eot = c->vocab_size - 1;

    LRSchedule sched;
    sched.type = sched_type;
    sched.max_lr = a.lr;
    sched.warmup_steps = a.warmup;
    sched.total_steps = (int)train_steps;
    sched.final_frac = a.final_frac;
    sched.decay_frac = 0.2f;

    uint64_t sample_rng = 1337;
    long start_step = 0;
    OutlierWindow loss_window = {{0}, 0}, norm_window = {{0}, 0};  // kept whether or not -sl / -sg is on
    if (resume_step >= 0) {
        TrainState st;
        state_peek(resume_state, &st);
        if (st.nproc != nproc || st.rank != rank)
            fatal("'%s' was written by rank %lld of %lld processes; resume with the same number of processes (now %d)",
                  resume_state, (long long)st.rank, (long long)st.nproc, nproc);
        if (st.zero_stage != (a.zero_stage && nproc > 1))
            fatal("'%s' was written with -z %lld; resume with the same -z (now %d)", resume_state, (long long)st.zero_stage, a.zero_stage);
        trainer_read_state(&model, resume_state, &st);
        if (st.B != a.B || st.T != a.T || st.total_batch_size != a.total_batch)
            fatal("'%s' was written with -b %lld -t %lld -d %lld; resume with the same values (got -b %d -t %d -d %d)",
                  resume_state, (long long)st.B, (long long)st.T, (long long)st.total_batch_size, a.B, a.T, a.total_batch);
        DataLoaderState ds = {(int)st.dl_epoch, (int)st.dl_shard_idx, (long)st.dl_sample_idx};
        if (have_train) dataloader_set_state(&train_loader, ds);
        sample_rng = st.sample_rng;
        loss_window = st.loss_window;
        norm_window = st.norm_window;
        start_step = st.step;
        printf("resumed from %s at step %ld\n", resume_model, start_step);
    }
    trainer_prepare(&model);
    // -x 0, as in llm.c: the loop's last step alone, which evaluates (val loss, -h 1, a sample) the
    // model of -e, or with -y 1 the latest checkpoint, and trains nothing
    if (a.max_steps == 0) train_steps = start_step;
    // with -nk, a checkpoint this run resumed from that is off the -n grid (a signal's stop) goes
    // once the run has written a newer one, so that stops do not pile up
    long stale_ckpt = resume_step >= 0 && a.keep_last > 0 && (a.ckpt_every <= 0 || start_step % a.ckpt_every != 0) ? start_step : -1;

    Logger logger;
    if (a.out_dir && rank == 0) ensure_dir(a.out_dir);
    multiproc_barrier(&mp);
    logger_init(&logger, a.out_dir, rank, resume_step >= 0);

    printf("+-----------------------+----------------------------------------------------+\n");
    printf("| model                 | %-50s |\n", resume_step >= 0 ? resume_model : a.model);
    printf("| layers / heads / C    | %-4d / %-4d / %-38d |\n", c->num_layers, c->num_heads, c->channels);
    printf("| vocab (padded)        | %-6d (%-6d)%-36s |\n", c->vocab_size, c->padded_vocab_size, "");
    printf("| parameters            | %-50zu |\n", gpt2_num_params_unpadded(&model.layout));
    printf("| B / T / total batch   | %-4d / %-5d / %-8d (grad accum %-4d)%-13s |\n", a.B, a.T, a.total_batch, grad_accum, "");
    printf("| processes / ZeRO      | %-4d / %-43s |\n", nproc, a.zero_stage && nproc > 1 ? "stage 1 (optimizer state sharded)" : "off");
    printf("| train / val tokens    | %-12ld / %-35ld |\n", train_loader.num_tokens_total, have_val ? val_loader.num_tokens_total : 0L);
    if (a.max_steps == 0) printf("| steps                 | %-50s |\n", "none (-x 0: evaluation only)");
    else printf("| steps                 | %-50ld |\n", train_steps);
    printf("| lr / schedule         | %-10g %-8s warmup %-6d final %-14g |\n", a.lr, a.lr_schedule, a.warmup, a.final_frac);
    trainer_banner(&model);
    printf("+-----------------------+----------------------------------------------------+\n");
    if (model.layout.structure.any_structured) gpt2_print_layer_table(&model.layout, stdout);
    double peak = trainer_peak_flops();
    double flops_per_token = gpt2_flops_per_token(&model.layout, a.T);
    write_run_info(&logger, command, resume_step >= 0 ? resume_model : a.model, start_step, train_steps, &model, flops_per_token, &a,
                   nproc, grad_accum);
    free(command);
    if (a.profile) {
        trainer_profile_start();
        if (a.profile == 2) {  // and the steps the structured layers mark (structured/step_hook.h)
            g_prof.steps_on = 1;
            g_st_step_hook = prof_mark_step;
        }
    }
    float *micro_loss = (float *)mallocCheck((size_t)grad_accum * sizeof(float));
    MoERouting *micro_routing = (MoERouting *)mallocCheck((size_t)grad_accum * sizeof(MoERouting));
    double total_time = 0.0;
    long timed_steps = 0;
    int overfit_loaded = 0;
    Checkpoints ckpts;
    memset(&ckpts, 0, sizeof(ckpts));
    long stop_step = -1;  // a signal's stop: the steps done when the loop left
    int stop_sig = 0;
    if (a.max_steps != 0) stop_install();
    for (long step = start_step; step <= train_steps; step++) {
        int last = step == train_steps;
        // the checkpoint comes first so that a resumed run replays this step's val and sample
        if (a.ckpt_every > 0 && step > start_step && (step % a.ckpt_every == 0 || last)) {
            save_checkpoint(&ckpts, &model, &a, &mp, &train_loader, step, sample_rng, &loss_window, &norm_window, stale_ckpt);
            stale_ckpt = -1;
        }
        const int eval_step = a.val_every > 0 && (step % a.val_every == 0 || last);  // val loss and -h 1
        if (eval_step && a.routing_loads && rank == 0 && step > start_step && trainer_n_routed(&model) > 0)
            print_routing_loads(&model, step);  // before the val forwards overwrite what the training batch routed
        if (have_val && eval_step) {
            float vl = val_loss(&model, &val_loader, a.val_max_steps, a.B, a.T);
            multiproc_mean(&mp, &vl, 1);
            printf("val loss %f\n", vl);
            logger_log_val(&logger, (int)step, vl);
        }
        if (have_eval && eval_step) {
            float acc = eval_accuracy(&model, &eval_loader, &mp);
            logger_log_eval(&logger, (int)step, acc);
        }
        if (rank == 0 && a.sample_every > 0 && ((step > 0 && step % a.sample_every == 0) || last)) {
            gpt2_sample(&model, &tokenizer, eot, a.gen_T, &sample_rng);
        }
        if (last) break;

        trainer_sync();
        double t0 = now_seconds();
        if (step > start_step) prof_step_begin(step + 1 == train_steps);  // as the timing, not the first step
        prof_mark("zero grad", 0.0);
        gpt2_zero_grad(&model);
        double loss = 0.0;
        // BTT-MoE: aux, balance and loads, each the mean over the micro-batches (loads: of each
        // micro-batch's extremes over the routed layers)
        float routed[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int micro = 0; micro < grad_accum; micro++) {
            // -a 1 reads one batch, the first time through (also after a resume), and keeps it
            prof_mark("data (host)", 0.0);
            if (!a.overfit || !overfit_loaded) dataloader_next_batch(&train_loader);
            overfit_loaded = 1;
            trainer_micro_step(&model, train_loader.inputs, train_loader.targets, a.B, a.T, 1.0f / grad_accum, micro, micro == grad_accum - 1);
        }
        trainer_step_losses(&model, grad_accum, micro_loss, micro_routing);
        for (int micro = 0; micro < grad_accum; micro++) {
            const float l = micro_loss[micro];
            const MoERouting r = micro_routing[micro];
            if (!isfinite(l) || !isfinite(r.aux))
                fatal("loss is %f (aux %f) at step %ld (micro-batch %d of %d): training diverged; lower -l (now %g), add warmup -u, "
                      "or check the data", l, r.aux, step, micro + 1, grad_accum, a.lr);
            loss += l;
            routed[0] += r.aux / grad_accum;
            routed[1] += r.balance / grad_accum;
            routed[2] += r.load_max / grad_accum;
            routed[3] += r.load_min / grad_accum;
        }
        // with a stop signal, one-hot (SIGTERM, SIGINT, SIGUSR1): every rank stops after the same
        // step, whichever ranks the signal reached
        prof_mark("loss and stop flags over the ranks (host)", 0.0);
        const int sig = stop_requested();
        // and whether this rank's background checkpoint write is done: 1 on average once all are
        float reported[9] = {(float)(loss / grad_accum), routed[0], routed[1], routed[2], routed[3],
                             sig == SIGTERM ? 1.0f : 0.0f, sig == SIGINT ? 1.0f : 0.0f, sig == SIGUSR1 ? 1.0f : 0.0f,
                             ckpt_writer_done(&ckpts.w) ? 1.0f : 0.0f};
        multiproc_mean(&mp, reported, 9);  // the routing is already global; the loss is each rank's tokens
        stop_sig = reported[5] > 0.0f ? SIGTERM : reported[6] > 0.0f ? SIGINT : reported[7] > 0.0f ? SIGUSR1 : 0;
        if (ckpts.pending && reported[8] == 1.0f) checkpoint_finish(&ckpts, &a, &mp, 1);
        loss = reported[0];
        const MoERouting routing = {reported[1], reported[2], reported[3], reported[4]};
        const int routed_model = trainer_n_routed(&model) > 0;
        if (nproc > 1) prof_mark("gradient averaging (what the backward did not hide)", 0.0);
        trainer_mean_grads(&model, &mp);
        prof_mark("gradient norm", 0.0);
        float norm = gpt2_grad_norm(&model);
        if (!isfinite(norm)) fatal("gradient norm is %f at step %ld: training diverged; lower -l (now %g)", norm, step, a.lr);
        float scale = (a.grad_clip > 0 && norm > a.grad_clip) ? a.grad_clip / norm : 1.0f;
        float lr = lr_schedule_get(&sched, (int)step);
        // -sl / -sg: a step whose loss or norm stands out from the last 100 changes nothing (the
        // schedule still advances). The ranks hold the same global loss and norm, up to the last
        // bit of a reduction; the decision is made common anyway, as a rank that skipped alone
        // would leave the others in ZeRO-1's gather.
        double loss_z = outlier_push(&loss_window, loss), norm_z = outlier_push(&norm_window, norm);
        char skip[80] = "";
        if (outlier_trips(loss_z, a.skip_loss_z)) snprintf(skip, sizeof(skip), " | update skipped: loss z %.1f > -sl %g", loss_z, a.skip_loss_z);
        else if (outlier_trips(norm_z, a.skip_norm_z)) snprintf(skip, sizeof(skip), " | update skipped: norm z %.1f > -sg %g", norm_z, a.skip_norm_z);
        if (nproc > 1 && (a.skip_loss_z > 0 || a.skip_norm_z > 0)) {
            float tripped = skip[0] ? 1.0f : 0.0f;
            multiproc_mean(&mp, &tripped, 1);
            if (tripped > 0 && !skip[0]) snprintf(skip, sizeof(skip), " | update skipped: another rank's z-score tripped");
        }
        prof_mark("update (AdamW)", 0.0);
        if (!skip[0]) gpt2_update(&model, lr, 0.9f, 0.95f, 1e-8f, a.weight_decay, scale, (int)step + 1);
        prof_step_end();
        trainer_sync();
        double dt = now_seconds() - t0;
        if (step > start_step) { total_time += dt; timed_steps++; }  // the first step warms caches and heuristics up
        double tok_s = a.total_batch / dt;
        char aux_str[64] = "", speed[48];
        if (routed_model)
            snprintf(aux_str, sizeof(aux_str), " | aux %.4f bal %.3f load %.2f-%.2f", routing.aux, routing.balance,
                     routing.load_min, routing.load_max);
        if (peak > 0) snprintf(speed, sizeof(speed), "MFU %.1f%%", 100.0 * flops_per_token * tok_s / peak);
        else snprintf(speed, sizeof(speed), "%.2f GFLOP/s", flops_per_token * tok_s / 1e9);
        printf("step %4ld/%ld | loss %.6f%s | norm %.4f | lr %.2e | %.2f ms | %.0f tok/s | %s%s\n", step + 1, train_steps,
               loss, aux_str, norm, lr, dt * 1e3, tok_s, speed, skip);
        trainer_step_end(&model, step + 1);
        fflush(stdout);
        logger_log_train(&logger, (int)step + 1, (float)loss, lr, norm, routed_model ? &routing : NULL, (float)tok_s);
        if (stop_sig) {
            stop_step = step + 1;
            break;
        }
    }
    checkpoint_finish(&ckpts, &a, &mp, 0);  // the last one's files, before the run ends or the stop's checkpoint
    if (timed_steps > 0) {
        double ms = total_time / timed_steps * 1e3, tok_s = a.total_batch / (ms / 1e3);
        printf("total average iteration time: %.2f ms | %.0f tok/s", ms, tok_s);
        if (peak > 0) printf(" | MFU %.1f%%", 100.0 * flops_per_token * tok_s / peak);
        printf("\n");
    }
    if (a.profile && rank == 0) prof_print(stdout, flops_per_token * a.total_batch / nproc, timed_steps > 0 ? total_time / timed_steps * 1e3 : 0.0);
    prof_free();

    if (stop_step >= 0) {  // the checkpoint the next step would have begun with (it replays the val and sample)
        if (a.out_dir) save_checkpoint(&ckpts, &model, &a, &mp, &train_loader, stop_step, sample_rng, &loss_window, &norm_window, stale_ckpt);
        checkpoint_finish(&ckpts, &a, &mp, 0);
        printf("stopped by %s after step %ld of %ld: %s\n", stop_signal_name(stop_sig), stop_step, train_steps,
               a.out_dir ? "rerun the same command with -y 1 to carry on" : "no checkpoint (no -o)");
        fflush(stdout);
    }
    ckpt_writer_free(&ckpts.w);
    free(micro_loss);
    free(micro_routing);
    if (have_val) dataloader_free(&val_loader);
    if (have_eval) evalloader_free(&eval_loader);
    dataloader_free(&train_loader);
    tokenizer_free(&tokenizer);
    gpt2_free(&model);
    multiproc_finalize(&mp);
    return stop_step >= 0 ? 128 + stop_sig : 0;  // as a shell reports a process a signal ended
}
