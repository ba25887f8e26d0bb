#!/usr/bin/env bash
# dev/bench/device_prep.sh: on a machine WITHOUT a GPU but with nvcc, builds everything the GPU
# checks and benchmarks run (train_gpt2cu, test_gpt2cu, every dev/cuda program; sm_90 unless
# GPU_COMPUTE_CAPABILITY says otherwise; single-GPU, no NCCL, except test_multigpu; without cuDNN, plus
# train_gpt2cu_cudnn and test_gpt2cu_cudnn with -fa 2 when the cuDNN frontend is installed here:
# they need the GPU machine's libcudnn, which the plain ones must not) and the tinyshakespeare shards,
# into .device/tree.tar.gz (git-ignored), laid out as in the repository (.device/COMMIT and ARCH say
# what was built). dev/bench/device_run.sh unpacks it
# over the tree on the GPU machine, so that the lent minutes go to running, not compiling:
#   bash dev/bench/device_prep.sh
#   then, through the device tool: run(command="bash dev/bench/device_run.sh", carry=[".device"])
set -euo pipefail
cd "$(dirname "$0")/../.."
CC_GPU=${GPU_COMPUTE_CAPABILITY:-90}
JOBS=${JOBS:-2}
rm -rf .device
mkdir -p .device/tree/dev/cuda .device/tree/data/tinyshakespeare
quiet() { grep -vE '^(OpenMP|CBLAS|MPI|MPI for train_gpt2cu|matmuls|nvcc|NCCL|cuDNN):' || true; }
if make -B -j"$JOBS" NO_NCCL=1 USE_CUDNN=1 GPU_COMPUTE_CAPABILITY="$CC_GPU" train_gpt2cu test_gpt2cu 2>&1 | quiet; then
    cp train_gpt2cu .device/tree/train_gpt2cu_cudnn
    cp test_gpt2cu .device/tree/test_gpt2cu_cudnn
else
    echo "device_prep: no cuDNN build (pip install --no-deps -r requirements-cudnn.txt for -fa 2)"
fi
make -B -j"$JOBS" NO_NCCL=1 USE_CUDNN=0 GPU_COMPUTE_CAPABILITY="$CC_GPU" train_gpt2cu test_gpt2cu 2>&1 | quiet
# the attention programs' v3 (cuDNN) as *_cudnn beside the plain ones, for the same reason
if [ -x .device/tree/train_gpt2cu_cudnn ]; then
    make -B -j"$JOBS" -C dev/cuda GPU_COMPUTE_CAPABILITY="$CC_GPU" CUDNN_OBJ="$PWD/build/cudnn_attention.o" CUDNN_LIBS="-lcudnn -lnvrtc" \
        attention_forward attention_backward 2>&1 | grep -E 'error|warning' || true
    for p in attention_forward attention_backward; do cp "dev/cuda/$p" ".device/tree/dev/cuda/${p}_cudnn"; done
    make -B -j"$JOBS" -C dev/cuda GPU_COMPUTE_CAPABILITY="$CC_GPU" attention_forward attention_backward 2>&1 | grep -E 'error|warning' || true
fi
make -j"$JOBS" -C dev/cuda GPU_COMPUTE_CAPABILITY="$CC_GPU" 2>&1 | grep -E 'error|warning' || true
cp train_gpt2cu test_gpt2cu .device/tree/
# the NCCL collectives alone (tests/test_multigpu.cu; a communicator of one rank there), without
# MPI, whose library the GPU machine may lack; its libnccl is the toolkit's or the nvidia-nccl wheel's
if make -B MPICC= GPU_COMPUTE_CAPABILITY="$CC_GPU" test_multigpu 2>&1 | quiet && [ -x test_multigpu ]; then
    cp test_multigpu .device/tree/
else
    echo "device_prep: no test_multigpu (NCCL not found here)"
fi
for src in dev/cuda/*.cu; do
    bin=${src%.cu}
    [ -x "$bin" ] || { echo "device_prep: $bin was not built"; exit 1; }
    cp "$bin" .device/tree/dev/cuda/
done
# shellcheck source=dev/bench/common.sh disable=SC1091
source dev/bench/common.sh
ensure_tinyshakespeare
cp data/tinyshakespeare/*.bin .device/tree/data/tinyshakespeare/
git rev-parse --short HEAD > .device/COMMIT
git diff --quiet || echo "(with uncommitted changes)" >> .device/COMMIT
echo "sm_$CC_GPU" > .device/ARCH
# the device tool carries at most 64 MiB: the tree goes packed (the binaries, with -lineinfo, take
# 153 MB with the data as files, 45 MB packed, at 764ff13)
raw=$(du -sm .device/tree | cut -f1)
tar -czf .device/tree.tar.gz -C .device/tree . && rm -rf .device/tree
packed=$(du -sm .device | cut -f1)
echo "device_prep: $raw MB of binaries and data, $packed MB packed in .device"
if [ "$packed" -gt 60 ]; then
    echo "device_prep: .device is over 60 MB; the device tool carries 64 MiB at most: leave programs out or strip them"
    exit 1
fi
echo "device_prep: ready; carry .device with: bash dev/bench/device_run.sh"
