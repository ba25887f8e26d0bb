# common.sh: shared by the benchmark scripts (sourced from the repository root).

# The tinyshakespeare train shard the benchmarks time on: prepared when missing, from the local
# copy in ../shared/data when there is one, else downloaded.
TRAIN=data/tinyshakespeare/tiny_shakespeare_train.bin
ensure_tinyshakespeare() {
    [ -f "$TRAIN" ] && return 0
    echo "preparing tinyshakespeare ($TRAIN missing)"
    if [ -f ../shared/data/tinyshakespeare/input.txt ]; then
        # offline: tiktoken's GPT-2 files from the shared cache unless the caller points elsewhere
        [ -d ../shared/data/tiktoken_cache ] && export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-../shared/data/tiktoken_cache}
        python3 data/tinyshakespeare.py --input ../shared/data/tinyshakespeare/input.txt
    else
        python3 data/tinyshakespeare.py
    fi
}

# at1_run LOG COMMAND...: a trainer run into LOG. Where it dies while -at 1 times a choice (a
# kernel that fails on this GPU; the error names the -ax word that leaves the choice out), it runs
# again with that choice left out, and so on, with a note for each; any other run is one run.
# Returns the last run's exit status.
at1_run() {
    local log=$1 ax="" tok rc
    shift
    while :; do
        "$@" ${ax:+-ax "$ax"} > "$log" 2>&1
        rc=$?
        [ $rc -eq 0 ] && return 0
        tok=$(grep -m1 -oE -- '-ax [a-z0-9]+ leaves that choice out' "$log" | awk '{ print $2 }')
        { [ -n "$tok" ] && [[ ",$ax," != *",$tok,"* ]]; } || return $rc
        echo "note: -at 1 died timing a choice: $(grep -m1 '^error' "$log" | cut -c1-240); again with -ax ${ax:+$ax,}$tok"
        ax=${ax:+$ax,}$tok
    done
}

# list_after LIST ITEM: the entries of the comma-separated LIST after ITEM, comma-separated (empty
# when ITEM is last or absent): what is left to run after the one a process died in.
list_after() { tr ',' '\n' <<< "$1" | awk -v x="$2" 'seen { print } $1 == x { seen = 1 }' | paste -sd, -; }

# cpu_runs_setup OUT SHARED: what the CPU structure runs start with: OUT/runs, train_gpt2 built,
# and the data (prepare_wiki_char).
cpu_runs_setup() {
    mkdir -p "$1/runs"
    make -s train_gpt2
    prepare_wiki_char "$1" "$2"
}

# prepare_wiki_char OUT SHARED: the character-level data of the CPU structure runs in OUT/data:
# the ASCII paragraphs (>= 200 characters) of the first 40 files of SHARED's Wikipedia sample, the
# one article also in WikiText-2's test split left out, in the 96-symbol character vocabulary;
# the first 1000 paragraphs are val. Skipped when OUT/data has them.
prepare_wiki_char() {
    local out=$1 shared=$2
    [ -f "$out/data/openwebtext_char_val_000000.bin" ] && return 0
    python3 - "$shared/wikipedia_en_2015" "$out/wiki_paragraphs.jsonl" <<'PY'
import glob, json, lzma, re, sys
files = sorted(glob.glob(sys.argv[1] + "/*/wiki_*.xz"))[:40]
with open(sys.argv[2], "w") as out:
    for fp in files:
        for m in re.finditer(r'<doc id="(\d+)"[^>]*>\n(.*?)</doc>', lzma.open(fp, "rt", encoding="utf-8").read(), re.S):
            if m.group(1) == "44122":  # also in WikiText-2's test split (SOURCES.md)
                continue
            for line in m.group(2).split("\n"):
                line = line.strip()
                if len(line) >= 200 and all(32 <= ord(c) < 127 for c in line):
                    out.write(json.dumps({"text": line}) + "\n")
PY
    TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$shared/tiktoken_cache} python3 data/openwebtext.py --input "$out/wiki_paragraphs.jsonl" \
        --vocab char --out "$out/data" --val_docs 1000 --shard_size 10000000
}
