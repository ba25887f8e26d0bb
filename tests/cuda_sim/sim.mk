# tests/cuda_sim/sim.mk: make rules for the CUDA sources executed on the CPU (tests/cuda_sim), for
# the top-level Makefile to `include tests/cuda_sim/sim.mk` (it uses its $(BUILD)). g++ only: no GPU
# or nvcc needed.
#   make test-cuda-sim    simify self-test, kernel tests (also in random thread order), the GPU
#                         trainer's main through the simulator, and test_gpt2.cu on the fixtures
#   make -j2 build/cuda_sim/test_sim_kernels build/cuda_sim/test_gpt2cu build/cuda_sim/train_gpt2cu build/cuda_sim/train_gpt2cu_mgpu
#            build/cuda_sim/test_multigpu
SIM_DIR = $(BUILD)/cuda_sim
SIM_CXX ?= g++
SIM_CXXFLAGS = -O2 -std=c++20 -pthread -fno-strict-aliasing -Wno-unknown-pragmas -DBT_WMMA_GENERIC -I $(SIM_DIR)/src -I tests/cuda_sim -I.
SIM_SOURCES = $(wildcard *.cu *.c cuda/*.cuh cuda/*.h cuda/*.cpp structured/*.cuh structured/*.h common/*.h tests/*.h tests/*.cu dev/cuda/*.cu dev/cuda/*.cuh)
SIM_DEPS = $(SIM_DIR)/src/.stamp tests/cuda_sim/cuda_sim.h
$(SIM_DIR)/src/.stamp: tests/cuda_sim/simify.py $(SIM_SOURCES) | $(BUILD)
	python3 tests/cuda_sim/simify.py --out $(SIM_DIR)/src
	touch $@
$(SIM_DIR)/test_sim_kernels: tests/cuda_sim/test_sim_kernels.cpp $(SIM_DEPS)
	$(SIM_CXX) $(SIM_CXXFLAGS) $< -o $@
$(SIM_DIR)/test_gpt2cu: $(SIM_DEPS)
	$(SIM_CXX) $(SIM_CXXFLAGS) -x c++ $(SIM_DIR)/src/test_gpt2.cu -o $@
$(SIM_DIR)/train_gpt2cu: $(SIM_DEPS)
	$(SIM_CXX) $(SIM_CXXFLAGS) -x c++ $(SIM_DIR)/src/train_gpt2.cu -o $@
# data parallelism: NCCL stood in for by nccl_sim.h (processes meeting in a mapped file), ranks
# started by mpirun when MPI is installed (else with -pi fs|tcp); tests/cuda_sim/test_sim_multigpu.sh
SIM_MPI_FLAGS = $(if $(MPICC),-DUSE_MPI $(shell $(MPICC) --showme:compile 2>/dev/null))
SIM_MPI_LIBS = $(if $(MPICC),$(shell $(MPICC) --showme:link 2>/dev/null))
$(SIM_DIR)/train_gpt2cu_mgpu: $(SIM_DEPS) tests/cuda_sim/nccl_sim.h
	$(SIM_CXX) $(SIM_CXXFLAGS) -DUSE_NCCL $(SIM_MPI_FLAGS) -x c++ $(SIM_DIR)/src/train_gpt2.cu $(SIM_MPI_LIBS) -o $@
$(SIM_DIR)/test_multigpu: $(SIM_DEPS) tests/cuda_sim/nccl_sim.h tests/test_multigpu.cu
	$(SIM_CXX) $(SIM_CXXFLAGS) -DUSE_NCCL $(SIM_MPI_FLAGS) -x c++ $(SIM_DIR)/src/tests/test_multigpu.cu $(SIM_MPI_LIBS) -o $@
# dev/cuda's programs on the simulator (the Makefile's SIM_DEV_PROGRAMS: tests/cuda_sim/test_sim_dev_programs.sh)
$(SIM_DIR)/dev_%: $(SIM_DEPS) dev/cuda/harness.cuh
	$(SIM_CXX) $(SIM_CXXFLAGS) -x c++ $(SIM_DIR)/src/dev/cuda/$*.cu -o $@
# the trainer's -fa 2 path, cuDNN stood in for by cudnn_attention_sim.cpp (plain loops on the
# contract of cuda/cudnn_attention.h)
SIM_CUDNN = tests/cuda_sim/cudnn_attention_sim.cpp cuda/cudnn_attention.h
$(SIM_DIR)/test_gpt2cu_cudnn: $(SIM_DEPS) $(SIM_CUDNN)
	$(SIM_CXX) $(SIM_CXXFLAGS) -DUSE_CUDNN -x c++ $(SIM_DIR)/src/test_gpt2.cu tests/cuda_sim/cudnn_attention_sim.cpp -o $@
$(SIM_DIR)/train_gpt2cu_cudnn: $(SIM_DEPS) $(SIM_CUDNN)
	$(SIM_CXX) $(SIM_CXXFLAGS) -DUSE_CUDNN -x c++ $(SIM_DIR)/src/train_gpt2.cu tests/cuda_sim/cudnn_attention_sim.cpp -o $@
.PHONY: test-cuda-sim
test-cuda-sim: $(SIM_DIR)/test_sim_kernels $(SIM_DIR)/test_gpt2cu $(SIM_DIR)/train_gpt2cu $(SIM_DIR)/test_gpt2cu_cudnn $(SIM_DIR)/train_gpt2cu_cudnn \
               $(SIM_DIR)/train_gpt2cu_mgpu $(SIM_DIR)/test_multigpu
	python3 tests/cuda_sim/simify.py --self-test
	$(SIM_DIR)/test_sim_kernels
	SIM_SERIAL=1 $(SIM_DIR)/test_sim_kernels sim order attention structured fused
	bash tests/cuda_sim/test_sim_trainer.sh
	bash tests/cuda_sim/test_sim_multigpu.sh
	$(SIM_DIR)/test_gpt2cu
	$(SIM_DIR)/test_gpt2cu_cudnn --cudnn-only
