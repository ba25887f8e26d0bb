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
