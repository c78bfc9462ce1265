# The two-command quick start: `make train` and `make test`. Each installs what is missing
# (scripts/install-deps.sh), configures and builds, then trains or tests.
BUILD_DIR  ?= build
BUILD_TYPE ?= Release
JOBS       ?= $(shell nproc)
VENV       ?= .venv
CONFIG     ?= configs/quickstart.json
# `make install`: bin/difftrain, the headers, the libraries and the CMake package under PREFIX.
# The default needs no root; system-wide: make build && sudo cmake --install build --prefix /usr/local
PREFIX     ?= $(HOME)/.local

.PHONY: all deps configure build test test-cpu-paths test-asan test-tsan train docs env install format-check clean

all: build

deps:
	@DIFFTRAIN_VENV=$(abspath $(VENV)) scripts/install-deps.sh

# Configure when the build directory has no build system yet (after deps, which may install
# ninja); CMake re-runs itself when its inputs change.
configure: deps
	@if [ ! -f $(BUILD_DIR)/build.ninja ] && [ ! -f $(BUILD_DIR)/Makefile ]; then \
	  gen=$$(command -v ninja >/dev/null && echo Ninja || echo "Unix Makefiles"); \
	  echo "cmake -S . -B $(BUILD_DIR) -G $$gen"; \
	  cmake -S . -B $(BUILD_DIR) -G "$$gen" -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) -DDIFFTRAIN_VENV=$(abspath $(VENV)) \
	    -DCMAKE_PREFIX_PATH="$$($(VENV)/bin/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"; \
	fi

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	ctest --test-dir $(BUILD_DIR) --output-on-failure -j $(JOBS)
	@$(MAKE) --no-print-directory test-cpu-paths

# The numerics tests (the suites comparing with diffusers and PyTorch) again on other CPU code
# paths: ATen's kernels with no vector ISA and for AVX2 (ATEN_CPU_CAPABILITY), and MKL's
# vendor-neutral path, which AMD CPUs take (MKL_CBWR=COMPATIBLE). Each pass makes its own reference
# in the same environment (the make_reference fixture).
CPU_PATHS ?= ATEN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE
NUMERICS_TESTS ?= ^(SchedulerVsDiffusers|Scheduler|SamplersVsDiffusers|Samplers|UNetVsDiffusers|UNet|GroupNormSiLU|AdamW|LrSchedule|EMA|ClipGradNorm|GradScaler|Accumulation|Sampling|Export|TrainerSwitches|PlainAndCapturable/TrainStep)\.
test-cpu-paths: build
	@for e in $(CPU_PATHS); do \
	  echo "== numerics tests with $$e"; \
	  env $$e ctest --test-dir $(BUILD_DIR) -R '$(NUMERICS_TESTS)' --output-on-failure -j $(JOBS) || exit 1; \
	done

# The tests under ASan + UBSan (unit, e2e, distributed) and under TSan (loader and distributed),
# each in its own build directory (build-asan, build-tsan); not part of `make test` (CI time).
test-asan test-tsan: deps
	DIFFTRAIN_VENV=$(abspath $(VENV)) scripts/test-sanitized.sh $(subst test-,,$@)

train: build
	$(BUILD_DIR)/difftrain train --config $(CONFIG) --resume latest

env: build
	$(BUILD_DIR)/difftrain env

# Builds what is installed (the CLI and the libraries it links), not the tests.
install: configure
	cmake --build $(BUILD_DIR) -j $(JOBS) --target difftrain
	cmake --install $(BUILD_DIR) --prefix $(PREFIX)

# Lines changed since main follow .clang-format (scripts/check-format.sh; also a ctest).
format-check:
	scripts/check-format.sh

# Regenerate docs/CONFIG.md from the config structs (a test fails when it is stale).
docs: build
	$(BUILD_DIR)/difftrain config docs > docs/CONFIG.md

clean:
	rm -rf $(BUILD_DIR)

# Container images (docs/DOCKER.md), built by scripts/docker-build.sh with Docker or podman:
# CUDA from the official PyTorch devel image, a slim Debian 12 image for CPUs, and the CPU image's
# test stage (unit tests and a training with --resume latest inside the image).
.PHONY: docker docker-cpu docker-test bench-train
docker:
	scripts/docker-build.sh cuda

docker-cpu:
	scripts/docker-build.sh cpu

docker-test:
	scripts/docker-build.sh cpu-test

# Training speed against the same model in PyTorch (scripts/bench/train.sh; docs/PERFORMANCE.md).
bench-train: build
	scripts/bench/train.sh --build $(BUILD_DIR)
