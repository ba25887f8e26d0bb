// convert_checkpoint: rewrites a GPT-2 checkpoint between llm.c's version 3 (fp32: train_gpt2 on
// the CPU, llm.c's fp32 trainers) and version 5 (bf16: train_gpt2cu, llm.c's train_gpt2cu).
//   ./convert_checkpoint IN OUT 5     fp32 -> bf16 (round to nearest even)
//   ./convert_checkpoint IN OUT 3     bf16 -> fp32 (exact)
// Structured checkpoints (version 10) have no llm.c counterpart and stay fp32. OUT is written
// atomically, so a failure leaves an existing OUT untouched.
#include "common/checkpoint.h"
#include "common/gpt2.h"

int main(int argc, char **argv) {
    if (argc != 4 || (strcmp(argv[3], "3") != 0 && strcmp(argv[3], "5") != 0)) {
        fprintf(stderr,
                "usage: %s IN OUT VERSION\n"
                "  VERSION 5: write llm.c's bf16 checkpoint (train_gpt2cu, llm.c's GPU trainer)\n"
                "  VERSION 3: write llm.c's fp32 checkpoint (train_gpt2, llm.c's CPU trainer)\n",
                argv[0]);
        return EXIT_FAILURE;
    }
    const char *in = argv[1], *out = argv[2];
    int to = atoi(argv[3]);
    FILE *probe = fopen(in, "rb");
    if (!probe) fatal("'%s': %s; give an llm.c checkpoint (version 3 or 5) to convert", in, strerror(errno));
    int magic = 0;
    size_t got = fread(&magic, sizeof(int), 1, probe);
    fcloseCheck(probe, in);
    if (got != 1 || magic != MODEL_MAGIC) fatal("'%s' is not a model checkpoint (magic %d, expected %d)", in, magic, MODEL_MAGIC);
    GPT2Layout g;
    ModelSource src;
    gpt2_layout_from_spec(&g, in, &src);
    if (src.version == MODEL_VERSION_STRUCT_FP32)
        fatal("'%s' is a structured model (version 10): llm.c has no format for it, so it stays fp32 version 10", in);
    size_t n = g.params.total;
    float *p = (float *)mallocCheck(n * sizeof(float));
    model_params_read(src.fp, in, src.version, p, n);
    fcloseCheck(src.fp, in);
    if (to == MODEL_VERSION_BF16) model_write_bf16_from_fp32(out, &g.config, p, n);
    else model_write_fp32(out, &g.config, NULL, p, n);
    printf("%s (version %d) -> %s (version %d): %zu parameters, d%d, vocab %d (padded %d)\n", in, src.version, out, to, n,
           g.config.num_layers, g.config.vocab_size, g.config.padded_vocab_size);
    free(p);
    gpt2_layout_free(&g);
    return EXIT_SUCCESS;
}
