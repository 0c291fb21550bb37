# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone
# with only Python >= 3.10 and make: they create .venv and install requirements.txt.
# In an environment you already have (Conda, a virtualenv, a cloud image with PyTorch),
# `make demo USE_ACTIVE_ENV=1` uses the Python on PATH as it is and installs nothing; an
# activated Conda or virtual environment that already satisfies requirements.txt is used
# the same way without asking. Every target says which Python and torch it runs.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
DEMO   := data/demo
EPOCHS ?= 60

ifndef USE_ACTIVE_ENV
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
ifneq ($(abspath $(VIRTUAL_ENV)),$(abspath $(VENV)))
USE_ACTIVE_ENV := $(shell $(PYTHON) tools/check_env.py --quiet && echo 1)
endif
endif
endif

ifeq ($(USE_ACTIVE_ENV),1)
PY    := $(PYTHON)
SETUP := active-env
else
PY    := $(VENV)/bin/python
SETUP := venv
endif
# the same Python from code/ (make train)
PY_FROM_CODE := $(if $(findstring /,$(PY)),$(abspath $(PY)),$(PY))

.PHONY: venv active-env demo test test-fast gpu-check data train clean-demo

# .venv, then which Python and torch it holds
venv: $(STAMP)
	@$(PY) tools/check_env.py

# reinstall only when requirements.txt changed since the last install
$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# the Python on PATH, which must already have what requirements.txt asks for
active-env:
	@$(PY) tools/check_env.py

$(DEMO)/train.txt: | $(SETUP)
	$(PY) tools/make_demo_data.py $(DEMO)

# train the default CNN on the offline demo set (CPU, a few minutes), then
# turn the run into figures and a table under results/demo/. In fp32 on every CPU
# (--no-amp), so that it prints the same figure everywhere (docs/benchmarks.md)
demo: $(SETUP) $(DEMO)/train.txt
	$(PY) code/main.py $(DEMO) --num-classes 10 --epochs 4 --warmup 1 -b 32 --lr 0.05 \
		-j 2 --device cpu --no-amp --seed 0 --name demo
	$(PY) tools/report.py "$$(ls -dt logs/exp_*_demo | head -1)" --out results/demo

test: $(SETUP)
	$(PY) -m pytest -q tests

# the quick part of the suite while editing (tests marked slow left out)
test-fast: $(SETUP)
	$(PY) -m pytest -q -m "not slow" tests

# every GPU check in one run (at most 8 minutes); the report goes to results/gpu-check/.
# Without CUDA it says so and exits 0; `tools/gpu_check.py --rehearse` runs it on the CPU.
gpu-check: $(SETUP)
	$(PY) tools/gpu_check.py

data:
	sh ./download_dataset.sh

# the handout's real run: SimpleNet-era recipe on MiniPlaces in data/
train: $(SETUP)
	cd code && $(PY_FROM_CODE) main.py ../data --epochs=$(EPOCHS)

clean-demo:
	rm -rf $(DEMO) results/demo
