# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone
# with only Python >= 3.10 and make: they create .venv and install requirements.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := data/demo
EPOCHS ?= 60

.PHONY: venv demo test gpu-check data train clean-demo

venv: $(STAMP)

# reinstall only when requirements.txt changed since the last install
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

$(DEMO)/train.txt: | $(STAMP)
	$(PY) code/make_demo_data.py $(DEMO)

# train the default CNN on the offline demo set (CPU, a few minutes), then
# turn the run into figures and a table under results/demo/
demo: $(STAMP) $(DEMO)/train.txt
	$(PY) code/main.py $(DEMO) --num-classes 10 --epochs 4 --warmup 1 -b 32 --lr 0.05 \
		-j 2 --device cpu --seed 0 --name demo
	$(PY) code/report.py "$$(ls -dt logs/exp_*_demo | head -1)" --out results/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# every GPU check in one run (at most 8 minutes); the report goes to results/gpu-check/.
# Without CUDA it says so and exits 0; `code/gpu_check.py --rehearse` runs it on the CPU.
gpu-check: $(STAMP)
	$(PY) code/gpu_check.py

data:
	sh ./download_dataset.sh

# the handout's real run: SimpleNet-era recipe on MiniPlaces in data/
train: $(STAMP)
	cd code && ../$(PY) main.py ../data --epochs=$(EPOCHS)

clean-demo:
	rm -rf $(DEMO) results/demo
