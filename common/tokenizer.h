// tokenizer.h: decode-only GPT-2 tokenizer reading llm.c's tokenizer .bin (token id -> byte string).
#pragma once
#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "utils.h"

#define TOKENIZER_MAGIC 20240328
#define TOKENIZER_HEADER_INTS 256
#define TOKENIZER_V1_EOT 50256  // version 1 files predate the eot field; GPT-2's <|endoftext|>

typedef struct { unsigned int vocab_size; char **token_table; int init_ok; int eot_token; } Tokenizer;

static inline void tokenizer_init(Tokenizer *t, const char *path) {
    memset(t, 0, sizeof(*t));
    t->eot_token = TOKENIZER_V1_EOT;
    FILE *fp = fopen(path, "rb");
    if (fp == NULL) {
        // Not fatal: training works without it, only the printed samples are lost.
        fprintf(stderr, "warning: cannot open tokenizer '%s' (%s); generated samples will not be decoded.\n"
                        "  write it with the model/data preparation script (python data/tinyshakespeare.py writes gpt2_tokenizer.bin beside the shards), or pass -tk <file>\n",
                path, strerror(errno));
        return;
    }
    int32_t header[TOKENIZER_HEADER_INTS];
    freadCheck(header, sizeof(int32_t), TOKENIZER_HEADER_INTS, fp, path);
    if (header[0] != TOKENIZER_MAGIC) {
        fatal("'%s' is not an llm.c tokenizer file: magic %d, expected %d; re-create it or pass the right file",
              path, (int)header[0], TOKENIZER_MAGIC);
    }
    int version = (int)header[1];
    if (version != 1 && version != 2) {
        fatal("'%s' has tokenizer version %d, expected 1 or 2; re-create it", path, version);
    }
    if (header[2] <= 0) fatal("'%s' says the vocabulary has %d tokens: corrupt, re-create it", path, (int)header[2]);
    t->vocab_size = (unsigned int)header[2];
    if (version == 2) {
        if (header[3] < 0 || (unsigned int)header[3] >= t->vocab_size) {
            fatal("'%s' has end-of-text token %d outside the vocabulary of %u: corrupt, re-create it",
                  path, (int)header[3], t->vocab_size);
        }
        t->eot_token = (int)header[3];
    }
    t->token_table = (char **)callocCheck(t->vocab_size, sizeof(char *));
    for (unsigned int i = 0; i < t->vocab_size; i++) {
        unsigned char len;
        freadCheck(&len, 1, 1, fp, path);
        t->token_table[i] = (char *)mallocCheck((size_t)len + 1);
        if (len > 0) freadCheck(t->token_table[i], 1, len, fp, path);
        t->token_table[i][len] = '\0';
    }
    fclose(fp);  // read-only: a close error cannot lose data
    t->init_ok = 1;
}

static inline const char *tokenizer_decode(const Tokenizer *t, unsigned int token_id) {
    if (!t->init_ok) return NULL;
    if (token_id >= t->vocab_size) {
        fprintf(stderr, "warning: token id %u is outside the vocabulary of %u; not decoded\n", token_id, t->vocab_size);
        return NULL;
    }
    return t->token_table[token_id];
}

// GPT-2 tokens can be single raw bytes (parts of UTF-8 sequences or control codes); printing
// a lone control byte can garble the terminal, so those are dropped. Multi-byte pieces are
// printed as they are.
static inline void safe_printf(const char *piece) {
    if (piece == NULL || piece[0] == '\0') return;
    if (piece[1] == '\0') {
        unsigned char c = (unsigned char)piece[0];
        if (!(isprint(c) || isspace(c))) return;
    }
    printf("%s", piece);
}

static inline void tokenizer_free(Tokenizer *t) {
    if (t->token_table != NULL) {
        for (unsigned int i = 0; i < t->vocab_size; i++) free(t->token_table[i]);
        free(t->token_table);
    }
    memset(t, 0, sizeof(*t));
}

// Where the data scripts put the tokenizer: beside the train shards, gpt2_tokenizer.bin, or
// char_tokenizer.bin for the 96-symbol character vocabulary.
static inline void default_tokenizer_path(const char *train_pattern, int vocab_size, char *buf, size_t cap) {
    const char *slash = strrchr(train_pattern, '/');
    const char *name = vocab_size == 96 ? "char_tokenizer.bin" : "gpt2_tokenizer.bin";
    if (slash) snprintf(buf, cap, "%.*s/%s", (int)(slash - train_pattern), train_pattern, name);
    else snprintf(buf, cap, "%s", name);
}
