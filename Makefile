# structgpt: builds the CPU trainer and its tests; degrades cleanly without OpenMP or a CBLAS.
#   make                 train_gpt2 test_gpt2 convert_checkpoint (OpenMP when found; matmuls below)
#   make test            build and run every test (C and Python), ending "N passed, N failed"
#   NO_OMP=1             build without OpenMP;  NO_BLAS=1 / USE_BLAS=1  built-in GEMM kernel / OpenBLAS
CC ?= gcc
CFLAGS ?= -O3 -march=native -ffast-math -fno-finite-math-only
CFLAGS += -std=gnu11 -Wall -Wextra -Wno-unused-parameter -Wno-unused-function -I.
LDLIBS = -lm
BUILD = build

# OpenMP: on unless NO_OMP=1 or the compiler lacks it
ifeq ($(NO_OMP),1)
  $(info OpenMP: off (NO_OMP=1))
else ifeq ($(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo yes),yes)
  CFLAGS += -fopenmp -DOMP
  $(info OpenMP: on)
else
  $(info OpenMP: not found, building single-threaded (apt-get install libgomp1))
endif

# The matmuls: common/gemm.h's kernel (AVX-512, AVX2+FMA or plain C, from -march) or OpenBLAS.
# Default: the built-in kernel where the compiler targets AVX-512 (on this project's Zen 5 machine
# it runs dense layers at 1.5x OpenBLAS 0.3.21's speed: dev/bench/RESULTS.md), else OpenBLAS when
# found. USE_BLAS=1 / NO_BLAS=1 force either. The structured layers always use the built-in
# kernel (a BLAS's per-call cost dominates their small products). train_gpt2.c calls sgemm
# single-threaded from its own OpenMP threads (openblas_set_num_threads(1)), so any OpenBLAS
# flavour works (pthread, openmp, serial): no second thread pool spins against OpenMP's.
HAVE_AVX512 := $(shell $(CC) $(CFLAGS) -dM -E -x c /dev/null 2>/dev/null | grep -q __AVX512F__ && echo yes)
HAVE_OPENBLAS := $(and $(wildcard /usr/include/cblas.h /usr/include/*/cblas.h /usr/include/openblas/cblas.h),$(shell echo 'int main(void){return 0;}' | $(CC) -x c - -lopenblas -o /dev/null 2>/dev/null && echo yes))
OPENBLAS_CFLAGS = -DUSE_CBLAS $(addprefix -I,$(dir $(firstword $(wildcard /usr/include/openblas/cblas.h))))
BLAS_CFLAGS =
BLAS_LIBS =
ifeq ($(NO_BLAS),1)
  $(info matmuls: built-in kernel (NO_BLAS=1))
else ifeq ($(USE_BLAS)$(HAVE_OPENBLAS),1)
  $(error USE_BLAS=1 but no OpenBLAS was found: apt-get install libopenblas-dev)
else ifeq ($(USE_BLAS)$(HAVE_OPENBLAS),1yes)
  BLAS_CFLAGS = $(OPENBLAS_CFLAGS)
  BLAS_LIBS = -lopenblas
  $(info matmuls: OpenBLAS (USE_BLAS=1))
else ifeq ($(HAVE_AVX512),yes)
  $(info matmuls: built-in AVX-512 kernel (faster here than OpenBLAS; USE_BLAS=1 for OpenBLAS))
else ifeq ($(HAVE_OPENBLAS),yes)
  BLAS_CFLAGS = $(OPENBLAS_CFLAGS)
  BLAS_LIBS = -lopenblas
  $(info matmuls: OpenBLAS)
else
  $(info matmuls: built-in kernel (no OpenBLAS found: apt-get install libopenblas-dev))
endif

# MPI (OpenMPI from Debian): the CPU trainer's data-parallel build, run with mpirun -np N
MPICC := $(shell command -v mpicc 2>/dev/null)
ifneq ($(MPICC),)
  MPI_TARGETS = train_gpt2_mpi
  $(info MPI: $(MPICC) (train_gpt2_mpi))
else
  MPI_TARGETS =
  $(info MPI: mpicc not found, no train_gpt2_mpi (apt-get install libopenmpi-dev openmpi-bin))
endif

COMMON_H = $(wildcard common/*.h structured/*.h)
# the CUDA sources on the CPU simulator (rules in tests/cuda_sim/sim.mk, included below)
# dev/cuda's programs whose GPU-sized problems the simulator runs in seconds (their checks against
# the CPU references; the timings mean nothing there), plan_ops, moe_layer, structured_epilogue and btt_backward on 64 rows:
# tests/cuda_sim/test_sim_dev_programs.sh
SIM_DEV_PROGRAMS = adamw encoder gelu classifier layernorm_forward layernorm_backward global_norm plan_ops moe_layer structured_epilogue structured_weight btt_forward btt_backward moe_group monarch_forward monarch_backward
SIM_CI = $(BUILD)/cuda_sim/test_sim_kernels $(BUILD)/cuda_sim/train_gpt2cu $(BUILD)/cuda_sim/test_gpt2cu \
         $(BUILD)/cuda_sim/train_gpt2cu_cudnn $(BUILD)/cuda_sim/test_gpt2cu_cudnn $(BUILD)/cuda_sim/train_gpt2cu_mgpu \
         $(BUILD)/cuda_sim/test_multigpu $(addprefix $(BUILD)/cuda_sim/dev_,$(SIM_DEV_PROGRAMS)) \
         $(BUILD)/cuda_sim/dev_structured_layers  # at tiny sizes: structured.sh's rerun past a dying case (tests/test_bench_rerun.sh)
C_TESTS = test_dataloader test_schedule test_tokenizer test_logger test_units test_structured test_gpu_plan test_flash_tiles test_rendezvous test_btt_tiles test_gemm
# the same tests with the other matmul paths: the plain C kernel, the AVX2 kernel where the
# default is AVX-512, and OpenBLAS where it is found but not the default
VARIANT_TESTS = test_gpt2_plain test_structured_plain test_gemm_plain $(if $(HAVE_AVX512),test_gemm_avx2 test_structured_avx2) \
                $(if $(and $(HAVE_OPENBLAS),$(if $(BLAS_LIBS),,yes)),test_gpt2_blas)

.PHONY: all test clean bench bench-layers
all: train_gpt2 test_gpt2 convert_checkpoint $(MPI_TARGETS)

train_gpt2: train_gpt2.c $(COMMON_H)
	$(CC) $(CFLAGS) $(BLAS_CFLAGS) $< $(LDLIBS) $(BLAS_LIBS) -o $@

convert_checkpoint: dev/convert_checkpoint.c $(COMMON_H)
	$(CC) $(CFLAGS) $< $(LDLIBS) -o $@

train_gpt2_mpi: train_gpt2.c $(COMMON_H)
	OMPI_CC=$(CC) $(MPICC) $(CFLAGS) $(BLAS_CFLAGS) -DUSE_MPI $< $(LDLIBS) $(BLAS_LIBS) -o $@

test_gpt2: test_gpt2.c train_gpt2.c $(COMMON_H) tests/check.h tests/fixture.h
	$(CC) $(CFLAGS) $(BLAS_CFLAGS) $< $(LDLIBS) $(BLAS_LIBS) -o $@

$(BUILD)/test_gpt2_plain: test_gpt2.c train_gpt2.c $(COMMON_H) tests/check.h tests/fixture.h | $(BUILD)
	$(CC) $(CFLAGS) -DCG_PLAIN_C $< $(LDLIBS) -o $@

$(BUILD)/test_gpt2_blas: test_gpt2.c train_gpt2.c $(COMMON_H) tests/check.h tests/fixture.h | $(BUILD)
	$(CC) $(CFLAGS) $(OPENBLAS_CFLAGS) $< $(LDLIBS) -lopenblas -o $@

$(BUILD)/test_structured_plain: tests/test_structured.c $(COMMON_H) tests/check.h | $(BUILD)
	$(CC) $(CFLAGS) -DCG_PLAIN_C $< $(LDLIBS) -o $@

$(BUILD)/test_gemm_plain: tests/test_gemm.c common/gemm.h tests/check.h | $(BUILD)
	$(CC) $(CFLAGS) -DCG_PLAIN_C $< $(LDLIBS) -o $@

$(BUILD)/test_gemm_avx2: tests/test_gemm.c common/gemm.h tests/check.h | $(BUILD)
	$(CC) $(CFLAGS) -mno-avx512f $< $(LDLIBS) -o $@

$(BUILD)/test_structured_avx2: tests/test_structured.c $(COMMON_H) tests/check.h | $(BUILD)
	$(CC) $(CFLAGS) -mno-avx512f $< $(LDLIBS) -o $@

$(BUILD)/test_%: tests/test_%.c $(COMMON_H) $(wildcard structured/*.h) tests/check.h train_gpt2.c | $(BUILD)
	$(CC) $(CFLAGS) $(BLAS_CFLAGS) $< $(LDLIBS) $(BLAS_LIBS) -o $@

$(BUILD):
	mkdir -p $(BUILD)

# make test builds its programs one job per core (at most 8; the simulator's builds of the trainer
# are 20-30 s of g++ each) unless -j was given, then runs them (tests/run_all.sh: in two lanes)
ifneq ($(filter test,$(MAKECMDGOALS)),)
  ifeq ($(filter -j%,$(MAKEFLAGS)),)
    MAKEFLAGS += -j$(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 8 ] && n=8; echo $$n)
  endif
endif
.PHONY: test-programs
test: test-programs
	bash tests/run_all.sh
test-programs: train_gpt2 test_gpt2 convert_checkpoint $(MPI_TARGETS) $(SIM_CI) $(addprefix $(BUILD)/,$(C_TESTS) $(VARIANT_TESTS))

bench: train_gpt2
	bash dev/bench/cpu.sh

$(BUILD)/bench_layers_cpu: dev/bench/layers_cpu.c train_gpt2.c $(COMMON_H) | $(BUILD)
	$(CC) $(CFLAGS) $(BLAS_CFLAGS) $< $(LDLIBS) $(BLAS_LIBS) -o $@

bench-layers: $(BUILD)/bench_layers_cpu
	$(BUILD)/bench_layers_cpu 4096 3

clean:
	rm -rf $(BUILD) train_gpt2 test_gpt2 train_gpt2_mpi convert_checkpoint

# ---------------------------------------------------------------------------------------------
# GPU trainer (train_gpt2.cu, test_gpt2.cu, cuda/*.cuh), built with nvcc when it is found.
#   make train_gpt2cu test_gpt2cu       -arch from nvidia-smi when a GPU is present
#   GPU_COMPUTE_CAPABILITY=80 make ...  force the target (default 90 without a GPU)
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
ifneq ($(NVCC),)
  ifeq ($(GPU_COMPUTE_CAPABILITY),)
    GPU_COMPUTE_CAPABILITY := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. ')
  endif
  ifeq ($(GPU_COMPUTE_CAPABILITY),)
    GPU_COMPUTE_CAPABILITY := 90
  endif
  # -lineinfo: source lines in compute-sanitizer's and ncu's reports (dev/bench/sanitize.sh); the code is the same
  NVCC_FLAGS = -O3 --use_fast_math -lineinfo -std=c++17 -I. -arch=sm_$(GPU_COMPUTE_CAPABILITY) \
               -Xcompiler -Wall,-Wextra,-Wno-unused-parameter,-Wno-unused-function
  NVCC_LDLIBS = -lcublas -lcublasLt
  CUDA_H = $(wildcard cuda/*.cuh structured/*.cuh) $(COMMON_H)
  $(info nvcc: $(NVCC), sm_$(GPU_COMPUTE_CAPABILITY))
  # multi-GPU: NCCL for the collectives (-DUSE_NCCL), MPI (mpicc's flags) to start the ranks under
  # mpirun; without MPI, NCCL ranks start with -pi fs|tcp; without NCCL, one process per run
  CUDA_ROOT := $(patsubst %/bin/nvcc,%,$(NVCC))
  # NO_NCCL=1: a single-GPU build even where NCCL is installed (dev/bench/device_prep.sh: binaries
  # for a machine whose NCCL may live elsewhere)
  ifneq ($(NO_NCCL),1)
  NCCL_H := $(firstword $(wildcard $(CUDA_ROOT)/include/nccl.h /usr/local/cuda/include/nccl.h /usr/include/nccl.h /usr/local/include/nccl.h))
  NCCL_LIBDIR := $(patsubst %/,%,$(dir $(firstword $(wildcard $(CUDA_ROOT)/lib/libnccl.so $(CUDA_ROOT)/lib64/libnccl.so \
                   /usr/local/cuda/lib/libnccl.so /usr/local/cuda/lib64/libnccl.so /usr/lib/x86_64-linux-gnu/libnccl.so /usr/lib64/libnccl.so))))
  endif
  TRAIN_CU_FLAGS =
  TRAIN_CU_LIBS =
  ifneq ($(and $(NCCL_H),$(NCCL_LIBDIR)),)
    TRAIN_CU_FLAGS += -DUSE_NCCL -I$(dir $(NCCL_H))
    TRAIN_CU_LIBS += -L$(NCCL_LIBDIR) -lnccl -Xlinker -rpath=$(NCCL_LIBDIR)
    $(info NCCL: $(NCCL_LIBDIR) (train_gpt2cu runs one process per GPU))
    ifneq ($(MPICC),)
      TRAIN_CU_FLAGS += -DUSE_MPI $(shell $(MPICC) --showme:compile 2>/dev/null)
      TRAIN_CU_LIBS += $(shell $(MPICC) --showme:link 2>/dev/null)
      $(info MPI for train_gpt2cu: mpirun -np N ./train_gpt2cu, or -pi fs|tcp without mpirun)
    else
      $(info MPI for train_gpt2cu: none; start ranks with -pn/-pr -pi fs|tcp -pf)
    endif
  else
    $(info NCCL: not found, train_gpt2cu runs a single process (NCCL ships with the CUDA toolkit or apt-get install libnccl-dev))
  endif
  # cuDNN's fused attention (-fa 2): cudnn.h and libcudnn (with the CUDA toolkit here) plus the
  # header-only cuDNN frontend: pip install --no-deps -r requirements-cudnn.txt, or a clone of
  # github.com/NVIDIA/cudnn-frontend in ~/cudnn-frontend, or CUDNN_FRONTEND_PATH=<its include dir>.
  # On when both are found; USE_CUDNN=0 builds without it, USE_CUDNN=1 fails when they are missing.
  ifneq ($(USE_CUDNN),0)
    CUDNN_FRONTEND_PATH ?= $(patsubst %/cudnn_frontend.h,%,$(firstword $(wildcard $(HOME)/cudnn-frontend/include/cudnn_frontend.h) \
        $(shell python3 -c "import site, os; print(*[os.path.join(p, 'include', 'cudnn_frontend.h') for p in site.getsitepackages() + [site.getusersitepackages()]])" 2>/dev/null)))
    CUDNN_H := $(firstword $(wildcard $(CUDA_ROOT)/include/cudnn.h /usr/include/cudnn.h /usr/include/x86_64-linux-gnu/cudnn.h))
  endif
  ifneq ($(and $(CUDNN_H),$(wildcard $(CUDNN_FRONTEND_PATH)/cudnn_frontend.h)),)
    CUDNN_OBJ = $(BUILD)/cudnn_attention.o
    CUDNN_FLAGS = -DUSE_CUDNN
    CUDNN_LIBS = -lcudnn -lnvrtc  # nvrtc: the frontend compiles some of its engines at run time
    $(info cuDNN: $(CUDNN_H), frontend $(CUDNN_FRONTEND_PATH) (-fa 2 in train_gpt2cu))
  else ifeq ($(USE_CUDNN),1)
    $(error USE_CUDNN=1: cudnn.h ($(or $(CUDNN_H),not found)) and cudnn_frontend.h (not found in '$(CUDNN_FRONTEND_PATH)') are both needed; see requirements-cudnn.txt)
  else
    $(info cuDNN: $(if $(filter 0,$(USE_CUDNN)),off (USE_CUDNN=0),frontend headers not found (pip install --no-deps -r requirements-cudnn.txt)): -fa 2 not built)
  endif
  # which way the binaries were built: switching USE_CUDNN (or installing the frontend) rebuilds them
  CUDNN_STAMP := $(BUILD)/cudnn_$(if $(CUDNN_OBJ),on,off).stamp
all: train_gpt2cu test_gpt2cu dev-cuda
# the flags the GPU binaries build with, for tests/test_ptxas.sh (one line: "NVCC_FLAGS ...")
.PHONY: print-nvcc-flags
print-nvcc-flags:
	@echo "NVCC_FLAGS $(NVCC_FLAGS)"
.PHONY: dev-cuda
dev-cuda: $(CUDNN_OBJ) $(CUDNN_STAMP)
	$(MAKE) -C dev/cuda GPU_COMPUTE_CAPABILITY=$(GPU_COMPUTE_CAPABILITY) CUDNN_OBJ="$(abspath $(CUDNN_OBJ))" CUDNN_LIBS="$(CUDNN_LIBS)" \
	    CUDNN_STAMP="$(abspath $(CUDNN_STAMP))"
$(BUILD)/cudnn_%.stamp: | $(BUILD)
	rm -f $(BUILD)/cudnn_*.stamp
	touch $@
# the frontend's headers take a minute to compile: once, into an object both programs link
$(BUILD)/cudnn_attention.o: cuda/cudnn_attention.cpp cuda/cudnn_attention.h | $(BUILD)
	$(NVCC) -O2 -std=c++17 -I. -isystem $(CUDNN_FRONTEND_PATH) -DCUDNN_FRONTEND_SKIP_JSON_LIB -Xcompiler -Wall,-Wextra -c $< -o $@
train_gpt2cu: train_gpt2.cu $(CUDA_H) $(CUDNN_OBJ) $(CUDNN_STAMP)
	$(NVCC) $(NVCC_FLAGS) $(TRAIN_CU_FLAGS) $(CUDNN_FLAGS) $< $(CUDNN_OBJ) $(NVCC_LDLIBS) $(CUDNN_LIBS) $(TRAIN_CU_LIBS) -o $@
test_gpt2cu: test_gpt2.cu train_gpt2.cu $(CUDA_H) tests/check.h tests/fixture.h $(CUDNN_OBJ) $(CUDNN_STAMP)
	$(NVCC) $(NVCC_FLAGS) $(CUDNN_FLAGS) $< $(CUDNN_OBJ) $(NVCC_LDLIBS) $(CUDNN_LIBS) -o $@
ifneq ($(and $(NCCL_H),$(NCCL_LIBDIR)),)
# the NCCL collectives of cuda/multigpu.cuh alone, checked and timed: mpirun -np <GPUs> ./test_multigpu
all: test_multigpu
test_multigpu: tests/test_multigpu.cu $(CUDA_H)
	$(NVCC) $(NVCC_FLAGS) $(TRAIN_CU_FLAGS) $< $(NVCC_LDLIBS) $(TRAIN_CU_LIBS) -o $@
endif
ifneq ($(CUDNN_OBJ),)
# the cuDNN graphs' layouts and the frontend's validation, on the CPU (tests/run_all.sh)
$(BUILD)/test_cudnn_graph: tests/test_cudnn_graph.cpp cuda/cudnn_attention.h tests/check.h $(CUDNN_OBJ) | $(BUILD)
	$(NVCC) -O2 -std=c++17 -I. $< $(CUDNN_OBJ) $(CUDNN_LIBS) -o $@
test-programs: $(BUILD)/test_cudnn_graph
endif
else
  $(info nvcc: not found, skipping the GPU trainer (train_gpt2cu, test_gpt2cu))
endif
# the CUDA sources executed on the CPU simulator (tests/cuda_sim; g++ only, no GPU)
include tests/cuda_sim/sim.mk

.PHONY: bench-gpu clean-gpu
bench-gpu:
	bash dev/bench/gpu.sh
clean-gpu:
	rm -f train_gpt2cu test_gpt2cu test_multigpu $(BUILD)/cudnn_attention.o
	$(MAKE) -C dev/cuda clean
clean: clean-gpu
