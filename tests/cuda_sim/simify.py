#!/usr/bin/env python3
"""simify.py: prepares the repository's CUDA sources for the CPU simulator (tests/cuda_sim/cuda_sim.h).

    python3 tests/cuda_sim/simify.py [--root .] [--out build/cuda_sim/src]
    python3 tests/cuda_sim/simify.py --self-test

Copies every C/C++/CUDA source of the repository (.cu .cuh .h .c .cpp .hpp; not build/, out/,
data/, .git/, tests/cuda_sim/) into the output directory, at the same relative paths, rewriting
only three things, in code (never in comments or string literals):

  - `#include <cuda_runtime.h>` (and cuda_bf16.h, cublas_v2.h, cublasLt.h, mma.h, cuda.h,
    cuda_fp16.h, cublas.h, cuda_runtime_api.h, cuda_profiler_api.h) becomes `#include "cuda_sim.h"`, and
    `#include <nccl.h>` `#include "nccl_sim.h"`;
  - after every static `__shared__ ...;` declaration, on the same line, `SIM_SHARED_POISON(name);`
    for each name it declares (cuda_sim.h refills the array with garbage at each block's start);
  - every kernel launch `name<<<grid, block[, smem[, stream]]>>>(args)` (name may be qualified
    and carry template arguments, `name<64, T>`; the launch may span lines) becomes
    `sim_launch(name, sim_cfg(grid, block[, smem[, stream]]).at("name", __FILE__, __LINE__), args)`.
    Newlines are kept, so line numbers (and __LINE__ in error messages) stay those of the sources.

It also writes sim_extern_shared.inc in the output directory: one SIM_EXTERN_SHARED(type, name,
tls_init) line per `extern __shared__ type name[]` found, the definitions cuda_sim.h includes.
Files are only rewritten when their content changes (make-friendly). Exits non-zero, naming the
file and line, on a launch it cannot parse.
"""
import argparse
import os
import re
import sys

SIM_HEADER = "cuda_sim.h"
NCCL_HEADER = "nccl_sim.h"  # NCCL between processes (multi-GPU code)
REPLACED_HEADERS = {
    "cuda_runtime.h", "cuda_runtime_api.h", "cuda.h", "cuda_bf16.h", "cuda_fp16.h",
    "cublas_v2.h", "cublas.h", "cublasLt.h", "mma.h", "device_launch_parameters.h", "cuda_profiler_api.h",
}
SOURCE_EXTS = (".cu", ".cuh", ".h", ".c", ".cpp", ".hpp")
SKIP_DIRS = {".git", "build", "out", "data", "__pycache__", "node_modules", "venv", ".venv"}
SKIP_PATHS = {os.path.join("tests", "cuda_sim")}
MAX_BYTES = 4 << 20


class SimifyError(Exception):
    pass


def code_mask(text):
    """For each character: True when it is code (not inside a comment, string or char literal)."""
    n = len(text)
    mask = bytearray(n)
    i = 0
    while i < n:
        c = text[i]
        if c == "/" and i + 1 < n and text[i + 1] == "/":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "/" and i + 1 < n and text[i + 1] == "*":
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c == "R" and i + 1 < n and text[i + 1] == '"' and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'R"([^()\\\s]{0,16})\(', text[i:])
            if m:
                end = text.find(")" + m.group(1) + '"', i + m.end())
                i = n if end < 0 else end + len(m.group(1)) + 2
                continue
        if c == '"' or (c == "'" and not (i > 0 and (text[i - 1].isalnum() and text[i - 1] not in "uULR"))):
            # a string or a character literal (a ' between digits is a C++14 digit separator)
            q = c
            j = i + 1
            while j < n and text[j] != q:
                if text[j] == "\\":
                    j += 1
                elif text[j] == "\n":
                    break
                j += 1
            i = j + 1
            continue
        mask[i] = 1
        i += 1
    return mask


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def match_forward(text, mask, start, open_c, close_c):
    """Index of the close_c matching the open_c at `start` (brackets of all kinds nest)."""
    depth = 0
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    i = start
    n = len(text)
    while i < n:
        if mask[i]:
            c = text[i]
            if c in pairs:
                stack.append(pairs[c])
            elif c in ")]}":
                if not stack or stack[-1] != c:
                    return -1
                stack.pop()
                if not stack and c == close_c:
                    return i
        i += 1
    return -1


def find_config_end(text, mask, start):
    """Index of the `>>>` closing a launch configuration that starts at `start` (after `<<<`)."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        if mask[i]:
            c = text[i]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
                if depth < 0:
                    return -1
            elif c == ">" and depth == 0 and text.startswith(">>>", i) and mask[i + 1] and mask[i + 2]:
                return i
            elif c == ";" and depth == 0:
                return -1
        i += 1
    return -1


def skip_back_group(text, mask, j):
    """j at a closing ')' or ']': index of its opening bracket."""
    closers = {")": "(", "]": "["}
    stack = []
    while j >= 0:
        c = text[j]
        if mask[j]:
            if c in closers:
                stack.append(closers[c])
            elif c in "([":
                if not stack or stack[-1] != c:
                    return -1
                stack.pop()
                if not stack:
                    return j
        j -= 1
    return -1


def skip_back_template(text, mask, j):
    """j at the '>' closing template arguments: index of the matching '<' (parentheses nest)."""
    angle, paren = 0, 0
    while j >= 0:
        c = text[j]
        if mask[j]:
            if c == ")":
                paren += 1
            elif c == "(":
                paren -= 1
            elif paren == 0 and c == ">":
                angle += 1
            elif paren == 0 and c == "<":
                angle -= 1
                if angle == 0:
                    return j
        j -= 1
    return -1


def kernel_name_start(text, mask, end):
    """Start of the kernel expression that ends just before `end` (exclusive): a postfix expression
    made of an identifier (optionally ::-qualified) with optional <template arguments>, calls
    (...) and subscripts [...]: `k`, `ns::k<64, T>`, `pick_kernel(&g)`, `table[i]`."""
    j = end - 1
    while j >= 0 and text[j].isspace():
        j -= 1
    while j >= 0 and text[j] in ")]":
        j = skip_back_group(text, mask, j)
        if j < 0:
            return -1
        j -= 1
        while j >= 0 and text[j].isspace():
            j -= 1
    if j >= 0 and text[j] == ">":
        j = skip_back_template(text, mask, j)
        if j < 0:
            return -1
        j -= 1
        while j >= 0 and text[j].isspace():
            j -= 1
    k = j
    while k >= 0 and (text[k].isalnum() or text[k] in "_:"):
        k -= 1
    name = text[k + 1:j + 1]
    if not re.match(r"^(::)?[A-Za-z_]\w*(::[A-Za-z_]\w*)*$", name):
        return -1
    return k + 1


def split_top_level(s):
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def rewrite_launches(text, path="<text>"):
    mask = code_mask(text)
    out = []
    pos = 0
    search = 0
    count = 0
    while True:
        p = text.find("<<<", search)
        if p < 0:
            break
        if not (mask[p] and mask[p + 1] and mask[p + 2]):
            search = p + 3
            continue
        start = kernel_name_start(text, mask, p)
        if start < 0:
            raise SimifyError("%s:%d: cannot find the kernel name before '<<<'" % (path, line_of(text, p)))
        cfg_end = find_config_end(text, mask, p + 3)
        if cfg_end < 0:
            raise SimifyError("%s:%d: no matching '>>>' for this launch" % (path, line_of(text, p)))
        cfg = text[p + 3:cfg_end]
        nparts = len(split_top_level(cfg))
        if nparts < 2 or nparts > 4 or not cfg.strip():
            raise SimifyError("%s:%d: a launch configuration has 2 to 4 parts, found %d: <<<%s>>>" % (path, line_of(text, p), nparts, cfg))
        a = cfg_end + 3
        while a < len(text) and text[a].isspace():
            a += 1
        if a >= len(text) or text[a] != "(" or not mask[a]:
            raise SimifyError("%s:%d: expected '(' after '>>>'" % (path, line_of(text, p)))
        close = match_forward(text, mask, a, "(", ")")
        if close < 0:
            raise SimifyError("%s:%d: unbalanced kernel arguments" % (path, line_of(text, p)))
        name = text[start:p]
        name_code = name.rstrip()
        name_str = re.sub(r"\s+", " ", name_code.strip()).replace("\\", "\\\\").replace('"', '\\"')
        args = text[a + 1:close]
        between = text[cfg_end + 3:a]  # whitespace (possibly newlines) between >>> and (
        repl = "sim_launch(%s, sim_cfg(%s).at(\"%s\", __FILE__, __LINE__)%s%s%s)" % (
            name_code, cfg, name_str, name[len(name_code):], between, (", " + args) if args.strip() else args)
        out.append(text[pos:start])
        out.append(repl)
        pos = close + 1
        search = close + 1
        count += 1
    out.append(text[pos:])
    return "".join(out), count


INCLUDE_RE = re.compile(r'^([ \t]*#[ \t]*include[ \t]*)[<"]([^>"]+)[>"]', re.M)


def rewrite_includes(text):
    mask = code_mask(text)

    def repl(m):
        if not mask[m.start(1) + m.group(1).index("#")]:
            return m.group(0)
        if m.group(2) in REPLACED_HEADERS:
            return '%s"%s" /* was <%s> */' % (m.group(1), SIM_HEADER, m.group(2))
        if m.group(2) == "nccl.h":
            return '%s"%s" /* was <%s> */' % (m.group(1), NCCL_HEADER, m.group(2))
        return m.group(0)

    return INCLUDE_RE.sub(repl, text)


EXTERN_SHARED_RE = re.compile(r"\bextern\s+__shared__\s+([^;\[\]]*?)\b([A-Za-z_]\w*)\s*\[\s*\]\s*;")


def extern_shared_arrays(text, path):
    mask = code_mask(text)
    found = []
    for m in EXTERN_SHARED_RE.finditer(text):
        if not mask[m.start()]:
            continue
        typ = re.sub(r"__align__\s*\(\s*\d+\s*\)", " ", m.group(1))
        typ = re.sub(r"\s+", " ", typ).strip()
        if not typ:
            raise SimifyError("%s:%d: extern __shared__ array without a type" % (path, line_of(text, m.start())))
        found.append((typ, m.group(2), "%s:%d" % (path, line_of(text, m.start()))))
    return found


STATIC_SHARED_RE = re.compile(r"\b__shared__\b")
DECLARATOR_NAME_RE = re.compile(r"([A-Za-z_]\w*)\s*(?:\[|=|$)")


def static_shared_names(decl, where):
    """The names a `__shared__ <decl>;` declares: `float a[32], b[2][4]` -> [a, b]."""
    decl = re.sub(r"__align__\s*\(\s*\d+\s*\)", " ", decl)
    parts, depth, cur = [], 0, ""
    for c in decl:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    names = []
    for i, part in enumerate(parts):
        part = part.strip()
        m = DECLARATOR_NAME_RE.search(part) if i == 0 else re.match(r"\**\s*([A-Za-z_]\w*)", part)
        if not m or (i == 0 and not part[:m.start()].strip()):
            raise SimifyError("%s: cannot read the names declared by `__shared__ %s;`" % (where, decl.strip()))
        names.append(m.group(1))
    return names


def rewrite_static_shared(text, path="<text>"):
    """After each (non-extern) `__shared__ ...;`, on the same line, SIM_SHARED_POISON(name) for each
    name it declares: cuda_sim.h refills the array with garbage when a block's first thread gets there."""
    mask = code_mask(text)
    edits = []
    for m in STATIC_SHARED_RE.finditer(text):
        if not mask[m.start()] or re.search(r"\bextern\s+$", text[max(0, m.start() - 40):m.start()]):
            continue
        end = m.end()
        while end < len(text) and not (text[end] == ";" and mask[end]):
            end += 1
        where = "%s:%d" % (path, line_of(text, m.start()))
        if end == len(text):
            raise SimifyError("%s: `__shared__` declaration without a `;`" % where)
        names = static_shared_names(text[m.end():end], where)
        edits.append((end + 1, "".join(" SIM_SHARED_POISON(%s);" % n for n in names)))
    for pos, ins in reversed(edits):
        text = text[:pos] + ins + text[pos:]
    return text, len(edits)


def simify_text(text, path="<text>"):
    text, n = rewrite_launches(text, path)
    text = rewrite_includes(text)
    text, _ = rewrite_static_shared(text, path)
    return text, n


def write_if_changed(path, content):
    try:
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as f:
            if f.read() == content:
                return False
    except OSError:
        pass
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(content)
    os.replace(tmp, path)
    return True


def source_files(root):
    for d, dirs, files in os.walk(root):
        rel_d = os.path.relpath(d, root)
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith(".")
                         and os.path.normpath(os.path.join(rel_d, x)) not in SKIP_PATHS)
        for f in sorted(files):
            if f.endswith(SOURCE_EXTS):
                p = os.path.join(d, f)
                if os.path.getsize(p) <= MAX_BYTES:
                    yield os.path.normpath(os.path.relpath(p, root))


def run(root, out):
    out_abs = os.path.abspath(out)
    launches = changed = files = 0
    shared = {}
    for rel in source_files(root):
        src = os.path.join(root, rel)
        if os.path.abspath(src).startswith(out_abs + os.sep):
            continue
        with open(src, "r", encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        new, n = simify_text(text, rel)
        for typ, name, where in extern_shared_arrays(text, rel):
            if name in shared and shared[name][0] != typ:
                raise SimifyError("%s: extern __shared__ %s has type '%s' here and '%s' at %s" % (where, name, typ, shared[name][0], shared[name][1]))
            shared.setdefault(name, (typ, where))
        launches += n
        files += 1
        changed += write_if_changed(os.path.join(out, rel), new)
    inc = ["// generated by tests/cuda_sim/simify.py: the `extern __shared__` arrays of the sources (dynamic shared memory)"]
    for name in sorted(shared):
        typ, where = shared[name]
        inc.append("SIM_EXTERN_SHARED(%s, %s, _ZTH%d%s)  // %s" % (typ, name, len(name), name, where))
    changed += write_if_changed(os.path.join(out, "sim_extern_shared.inc"), "\n".join(inc) + "\n")
    print("simify: %d files (%d rewritten), %d launches, %d extern __shared__ arrays -> %s" % (files, changed, launches, len(shared), out))


def self_test():
    cases = [
        ("k<<<g, b>>>(x, y);", 'sim_launch(k, sim_cfg(g, b).at("k", __FILE__, __LINE__), x, y);'),
        ("k<<<g, b, 0, s>>>();", 'sim_launch(k, sim_cfg(g, b, 0, s).at("k", __FILE__, __LINE__));'),
        ("f<D><<<dim3(a, b), 128, smem>>>(o, f(1, 2));",
         'sim_launch(f<D>, sim_cfg(dim3(a, b), 128, smem).at("f<D>", __FILE__, __LINE__), o, f(1, 2));'),
        ("ns::f<(a>b), T<int>> <<<1, 32>>>\n  (p,\n   q);",
         'sim_launch(ns::f<(a>b), T<int>>, sim_cfg(1, 32).at("ns::f<(a>b), T<int>>", __FILE__, __LINE__) \n  , p,\n   q);'),
        ("pick(&g)<<<grid, T, g.smem>>>(y, g);", 'sim_launch(pick(&g), sim_cfg(grid, T, g.smem).at("pick(&g)", __FILE__, __LINE__), y, g);'),
        ("tab[i]<<<1, 32>>>(y);", 'sim_launch(tab[i], sim_cfg(1, 32).at("tab[i]", __FILE__, __LINE__), y);'),
        ("k<<<n >> 1, 256>>>(x >> 2);", 'sim_launch(k, sim_cfg(n >> 1, 256).at("k", __FILE__, __LINE__), x >> 2);'),
        ("// k<<<1, 1>>>(x);\n/* k<<<1,1>>>() */ s = \"k<<<1,1>>>()\";", None),
        ("k<<<ceil_div(n,\n 256), 256>>>(a,\n b);", 'sim_launch(k, sim_cfg(ceil_div(n,\n 256), 256).at("k", __FILE__, __LINE__), a,\n b);'),
    ]
    bad = 0
    for src, want in cases:
        got, _ = rewrite_launches(src)
        want = src if want is None else want
        if got != want:
            print("FAIL launch rewrite:\n  src  %r\n  got  %r\n  want %r" % (src, got, want))
            bad += 1
        if got.count("\n") != src.count("\n"):
            print("FAIL line count changed for %r" % src)
            bad += 1
    inc = rewrite_includes('#include <cuda_runtime.h>\n  # include <mma.h>\n#include <stdio.h>\n// #include <cublasLt.h>\n#include <nccl.h>\n')
    want_inc = ('#include "cuda_sim.h" /* was <cuda_runtime.h> */\n  # include "cuda_sim.h" /* was <mma.h> */\n'
                '#include <stdio.h>\n// #include <cublasLt.h>\n#include "nccl_sim.h" /* was <nccl.h> */\n')
    if inc != want_inc:
        print("FAIL include rewrite: %r" % inc)
        bad += 1
    es = extern_shared_arrays("  extern __shared__ __align__(128) unsigned char flash_smem[];\n// extern __shared__ float x[];\n", "t")
    if [(t, n) for t, n, _ in es] != [("unsigned char", "flash_smem")]:
        print("FAIL extern shared: %r" % es)
        bad += 1
    ss, _ = rewrite_static_shared("  __shared__ float sh_m[32], sh_s[32];\n  extern __shared__ float dyn[];\n"
                                  "  __shared__ __align__(128) floatX w[SW][2 * 256];  // __shared__ x;\n  __shared__ int n;\n")
    want_ss = ("  __shared__ float sh_m[32], sh_s[32]; SIM_SHARED_POISON(sh_m); SIM_SHARED_POISON(sh_s);\n  extern __shared__ float dyn[];\n"
               "  __shared__ __align__(128) floatX w[SW][2 * 256]; SIM_SHARED_POISON(w);  // __shared__ x;\n"
               "  __shared__ int n; SIM_SHARED_POISON(n);\n")
    if ss != want_ss:
        print("FAIL static shared rewrite:\n  got  %r\n  want %r" % (ss, want_ss))
        bad += 1
    for broken in ("k<<<1>>>(x);", "<<<1, 2>>>(x);", "k<<<1, 2>>> x;"):
        try:
            rewrite_launches(broken)
            print("FAIL no error for %r" % broken)
            bad += 1
        except SimifyError:
            pass
    print("simify self-test: %s" % ("FAILED" if bad else "ok"))
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--out", default=os.path.join("build", "cuda_sim", "src"))
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    if a.self_test:
        return self_test()
    try:
        run(a.root, a.out)
    except SimifyError as e:
        print("simify: error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
