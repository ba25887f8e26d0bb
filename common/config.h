// config.h: the GPT-2 model configuration: llm.c's depth presets (-e dN) and model config files.
#pragma once
#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "utils.h"

typedef struct {
    int max_seq_len;        // maxT
    int vocab_size;         // V
    int padded_vocab_size;  // Vp: V rounded up to a multiple of 128, for aligned matmuls
    int num_layers;         // L
    int num_heads;          // NH
    int channels;           // C
} GPT2Config;

static inline int pad_vocab(int V) { return ((V + 127) / 128) * 128; }

static inline void gpt2_config_validate(const GPT2Config *c, const char *where) {
    if (c->num_layers < 1 || c->num_heads < 1 || c->channels < 1 || c->max_seq_len < 1 || c->vocab_size < 2)
        fatal("%s: n_layer, n_head, n_embd, max_seq_len must be >= 1 and vocab_size >= 2 (got %d, %d, %d, %d, %d)",
              where, c->num_layers, c->num_heads, c->channels, c->max_seq_len, c->vocab_size);
    if (c->channels % c->num_heads != 0)
        fatal("%s: n_embd = %d is not divisible by n_head = %d; choose n_head dividing n_embd", where, c->channels, c->num_heads);
    if (c->vocab_size > 65536)
        fatal("%s: vocab_size = %d does not fit the uint16 tokens of data shards (max 65536)", where, c->vocab_size);
    if (c->padded_vocab_size < c->vocab_size || c->padded_vocab_size % 128 != 0)
        fatal("%s: padded vocab %d must be a multiple of 128 and >= vocab_size %d", where, c->padded_vocab_size, c->vocab_size);
}

// llm.c's GPT-2 family: "d12" is GPT-2 124M, "d24" 350M, "d36" 774M, "d48" 1558M.
// Returns 0 if name is not of the form dN with a known N.
static inline int gpt2_config_from_depth_name(const char *name, GPT2Config *c) {
    if (name[0] != 'd' || !isdigit((unsigned char)name[1])) return 0;
    char *end;
    long depth = strtol(name + 1, &end, 10);
    if (*end != '\0') return 0;
    static const int presets[][3] = {  // depth, channels, heads
        {2, 128, 2}, {4, 256, 4}, {6, 384, 6}, {12, 768, 12}, {24, 1024, 16}, {36, 1280, 20}, {48, 1600, 25}, {60, 1920, 30},
    };
    for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++) {
        if (presets[i][0] == depth) {
            c->num_layers = presets[i][0];
            c->channels = presets[i][1];
            c->num_heads = presets[i][2];
            c->max_seq_len = 1024;
            c->vocab_size = 50257;
            c->padded_vocab_size = pad_vocab(c->vocab_size);
            return 1;
        }
    }
    fatal("-e %s: no GPT-2 preset of depth %ld; use one of d2 d4 d6 d12 d24 d36 d48 d60, or a config file", name, depth);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Config files: `key = value` lines, `#` comments, `[section]` headers. The parse keeps every
// entry with its line number so that each consumer can report "file:line" for its own keys.

typedef struct {
    char section[64];  // "" for the top (model) section
    char key[64];
    char value[256];
    int line;
    int used;          // set by the consumer; anything left unused is an error
} ConfigEntry;

typedef struct {
    char path[1024];
    char *text;        // the whole file, stored verbatim in structured checkpoints
    int n;
    ConfigEntry *entries;
} ConfigFile;

static inline char *config_strip(char *s) {
    while (isspace((unsigned char)*s)) s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1])) *--e = '\0';
    return s;
}

// Parse text (from a file called `path`, for messages). Syntax errors are fatal with file:line.
static inline void config_parse_text(ConfigFile *cf, const char *path, const char *text) {
    memset(cf, 0, sizeof(*cf));
    snprintf(cf->path, sizeof(cf->path), "%s", path);
    cf->text = (char *)mallocCheck(strlen(text) + 1);
    strcpy(cf->text, text);
    int cap = 16;
    cf->entries = (ConfigEntry *)mallocCheck(cap * sizeof(ConfigEntry));
    char section[64] = "";
    const char *p = text;
    int lineno = 0;
    while (*p) {
        lineno++;
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        char buf[1024];
        if (len >= sizeof(buf)) fatal("%s:%d: line too long (max %zu characters)", path, lineno, sizeof(buf) - 1);
        memcpy(buf, p, len);
        buf[len] = '\0';
        p = nl ? nl + 1 : p + len;
        char *hash = strchr(buf, '#');
        if (hash) *hash = '\0';
        char *s = config_strip(buf);
        if (*s == '\0') continue;
        if (*s == '[') {
            char *close = strchr(s, ']');
            if (!close || config_strip(close + 1)[0] != '\0')
                fatal("%s:%d: bad section header '%s'; write it as [name]", path, lineno, s);
            *close = '\0';
            char *name = config_strip(s + 1);
            if (*name == '\0' || strlen(name) >= sizeof(section))
                fatal("%s:%d: empty or too long section name", path, lineno);
            snprintf(section, sizeof(section), "%s", name);
            continue;
        }
        char *eq = strchr(s, '=');
        if (!eq) fatal("%s:%d: expected 'key = value', got '%s'", path, lineno, s);
        *eq = '\0';
        char *key = config_strip(s), *value = config_strip(eq + 1);
        if (*key == '\0') fatal("%s:%d: missing key before '='", path, lineno);
        if (*value == '\0') fatal("%s:%d: key '%s' has no value", path, lineno, key);
        if (strlen(key) >= 64 || strlen(value) >= 256) fatal("%s:%d: key or value too long", path, lineno);
        for (int i = 0; i < cf->n; i++) {
            if (strcmp(cf->entries[i].section, section) == 0 && strcmp(cf->entries[i].key, key) == 0)
                fatal("%s:%d: '%s' is already set at line %d of this section; keep one", path, lineno, key, cf->entries[i].line);
        }
        if (cf->n == cap) {
            cap *= 2;
            cf->entries = (ConfigEntry *)realloc(cf->entries, cap * sizeof(ConfigEntry));
            if (!cf->entries) fatal("out of memory parsing %s", path);
        }
        ConfigEntry *e = &cf->entries[cf->n++];
        snprintf(e->section, sizeof(e->section), "%s", section);
        snprintf(e->key, sizeof(e->key), "%s", key);
        snprintf(e->value, sizeof(e->value), "%s", value);
        e->line = lineno;
        e->used = 0;
    }
}

static inline void config_parse_file(ConfigFile *cf, const char *path) {
    FILE *fp = fopenCheck(path, "rb");
    fseekCheck(fp, 0, SEEK_END, path);
    long size = ftell(fp);
    fseekCheck(fp, 0, SEEK_SET, path);
    if (size > (1 << 20)) fatal("'%s' is %ld bytes; a model config is a small text file (is this the right file?)", path, size);
    char *text = (char *)mallocCheck((size_t)size + 1);
    freadCheck(text, 1, (size_t)size, fp, path);
    text[size] = '\0';
    fcloseCheck(fp, path);
    if (memchr(text, '\0', (size_t)size)) fatal("'%s' contains NUL bytes: not a text config file", path);
    config_parse_text(cf, path, text);
    free(text);
}

static inline void config_free(ConfigFile *cf) {
    free(cf->text);
    free(cf->entries);
    memset(cf, 0, sizeof(*cf));
}

static inline ConfigEntry *config_find(ConfigFile *cf, const char *section, const char *key) {
    for (int i = 0; i < cf->n; i++) {
        if (strcmp(cf->entries[i].section, section) == 0 && strcmp(cf->entries[i].key, key) == 0) return &cf->entries[i];
    }
    return NULL;
}

static inline int config_parse_int(const ConfigFile *cf, const ConfigEntry *e, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(e->value, &end, 10);
    if (errno || *end != '\0' || v < lo || v > hi)
        fatal("%s:%d: '%s = %s' must be an integer in [%ld, %ld]", cf->path, e->line, e->key, e->value, lo, hi);
    return (int)v;
}

// Read an integer key of the top section; `def` < 0 means the key is required.
static inline int config_get_int(ConfigFile *cf, const char *key, int def, long lo, long hi) {
    ConfigEntry *e = config_find(cf, "", key);
    if (!e) {
        if (def < 0) fatal("%s: missing required key '%s' (add a line '%s = <integer>')", cf->path, key, key);
        return def;
    }
    e->used = 1;
    return config_parse_int(cf, e, lo, hi);
}

#define GPT2_CONFIG_KEYS "n_layer n_head n_embd vocab_size max_seq_len"

// The model section of a config file. Other sections are left for their own consumers.
static inline void gpt2_config_from_file(ConfigFile *cf, GPT2Config *c) {
    c->num_layers = config_get_int(cf, "n_layer", -1, 1, 1000);
    c->num_heads = config_get_int(cf, "n_head", -1, 1, 1000);
    c->channels = config_get_int(cf, "n_embd", -1, 1, 1 << 16);
    c->vocab_size = config_get_int(cf, "vocab_size", 50257, 2, 65536);
    c->max_seq_len = config_get_int(cf, "max_seq_len", 1024, 1, 1 << 20);
    c->padded_vocab_size = pad_vocab(c->vocab_size);
    gpt2_config_validate(c, cf->path);
}
