// test_tokenizer.c: llm.c tokenizer files (versions 1 and 2) decode back; missing and corrupt files; safe_printf.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "common/tokenizer.h"
#include "tests/check.h"

static const char *k_vocab[] = { "a", "hello", " world", "\n", "\x01", "\xe2\x82", "<|endoftext|>" };
enum { K_VOCAB = 7, K_EOT = 6 };

// drop_bytes > 0 cuts the file short, to make a truncated one.
static void write_tokenizer(const char *path, int magic, int version, int vocab, int eot, long drop_bytes) {
    int32_t header[256];
    memset(header, 0, sizeof(header));
    header[0] = magic; header[1] = version; header[2] = vocab; header[3] = eot;
    FILE *fp = fopenCheck(path, "wb");
    fwriteCheck(header, sizeof(int32_t), 256, fp, path);
    long size = 1024;
    for (int i = 0; i < K_VOCAB; i++) {
        unsigned char len = (unsigned char)strlen(k_vocab[i]);
        fwriteCheck(&len, 1, 1, fp, path);
        fwriteCheck(k_vocab[i], 1, len, fp, path);
        size += 1 + len;
    }
    fcloseCheck(fp, path);
    if (drop_bytes > 0 && truncate(path, size - drop_bytes) != 0) { perror("truncate"); exit(2); }
}


static void child_init(const void *arg) {
    const char *path = (const char *)arg;
    Tokenizer t;
    tokenizer_init(&t, path);
    tokenizer_free(&t);
}

static void child_print_all(const void *arg) {
    const char *path = (const char *)arg;
    Tokenizer t;
    tokenizer_init(&t, path);
    for (unsigned int i = 0; i < t.vocab_size; i++) { safe_printf(tokenizer_decode(&t, i)); printf("|"); }
    safe_printf(NULL);
    safe_printf("");
    safe_printf("\t");
    safe_printf("\x7f");
    tokenizer_free(&t);
}

static void expect_fail(const char *name, const char *path, const char *must_say) {
    char err[4096], why[4400], nm[256];
    int code = run_child(child_init, path, 2, err, sizeof(err));
    snprintf(why, sizeof(why), "exit %d, stderr: %s", code, err);
    check_true(code != 0 && code != -1, name, why);
    snprintf(nm, sizeof(nm), "%s: message names the file", name);
    check_true(strstr(err, path) != NULL, nm, why);
    snprintf(nm, sizeof(nm), "%s: message says '%s'", name, must_say);
    check_true(strstr(err, must_say) != NULL, nm, why);
}

int main(void) {
    char dir[] = "/tmp/test_tokenizer_XXXXXX";
    if (mkdtemp(dir) == NULL) { perror("mkdtemp"); return 2; }
    char p2[512], p1[512], pbad[512], pmissing[512];
    snprintf(p2, sizeof(p2), "%s/tok_v2.bin", dir);
    snprintf(p1, sizeof(p1), "%s/tok_v1.bin", dir);
    snprintf(pbad, sizeof(pbad), "%s/tok_bad.bin", dir);
    snprintf(pmissing, sizeof(pmissing), "%s/does_not_exist.bin", dir);

    write_tokenizer(p2, 20240328, 2, K_VOCAB, K_EOT, 0);
    Tokenizer t;
    tokenizer_init(&t, p2);
    check_true(t.init_ok == 1 && t.vocab_size == K_VOCAB, "v2: loads with the header's vocab size", NULL);
    check_true(t.eot_token == K_EOT, "v2: eot token from the header", NULL);
    int same = 1;
    for (int i = 0; i < K_VOCAB; i++) same &= tokenizer_decode(&t, (unsigned)i) != NULL && strcmp(tokenizer_decode(&t, (unsigned)i), k_vocab[i]) == 0;
    check_true(same, "v2: every token decodes to its bytes", NULL);
    check_true(tokenizer_decode(&t, K_VOCAB) == NULL && tokenizer_decode(&t, 0xFFFFFFFFu) == NULL, "v2: out-of-range ids decode to NULL", NULL);
    tokenizer_free(&t);
    check_true(t.token_table == NULL && t.init_ok == 0, "free clears the struct", NULL);

    write_tokenizer(p1, 20240328, 1, K_VOCAB, 3, 0);  // v1 ignores header[3]
    tokenizer_init(&t, p1);
    check_true(t.init_ok == 1 && t.eot_token == 50256, "v1: eot is GPT-2's 50256", NULL);
    check_true(strcmp(tokenizer_decode(&t, 2), " world") == 0, "v1: decodes", NULL);
    tokenizer_free(&t);

    {
        char err[4096];
        int code = run_child(child_init, pmissing, 2, err, sizeof(err));
        check_true(code == 0, "missing file: no exit", err);
        check_true(strstr(err, "warning") != NULL && strstr(err, pmissing) != NULL, "missing file: warning names the file", err);
        tokenizer_init(&t, pmissing);
        check_true(t.init_ok == 0, "missing file: init_ok = 0", NULL);
        check_true(tokenizer_decode(&t, 0) == NULL, "missing file: decode returns NULL", NULL);
        tokenizer_free(&t);
    }

    {
        char out[4096];
        int code = run_child(child_print_all, p2, 1, out, sizeof(out));
        // "\x01" (a lone control byte) and "\x7f" are dropped; the partial UTF-8 pair is multi-byte and kept
        const char *want = "a|hello| world|\n||\xe2\x82|<|endoftext|>|\t";
        check_true(code == 0 && strcmp(out, want) == 0, "safe_printf: drops lone unprintable bytes only", out);
    }

    write_tokenizer(pbad, 12345, 2, K_VOCAB, K_EOT, 0);
    expect_fail("bad magic", pbad, "magic 12345");
    write_tokenizer(pbad, 20240328, 3, K_VOCAB, K_EOT, 0);
    expect_fail("bad version", pbad, "version 3");
    write_tokenizer(pbad, 20240328, 2, K_VOCAB, K_EOT, 5);
    expect_fail("truncated", pbad, "truncated");
    write_tokenizer(pbad, 20240328, 2, K_VOCAB, K_VOCAB, 0);
    expect_fail("eot outside vocab", pbad, "end-of-text token 7");
    write_tokenizer(pbad, 20240328, 2, 0, 0, 0);
    expect_fail("empty vocab", pbad, "0 tokens");

    unlink(p1); unlink(p2); unlink(pbad);
    rmdir(dir);
    return test_summary();
}
