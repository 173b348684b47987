# The two commands of the README:
#   make demo   set up .venv, build bmssl, run the main job
#   make test   set up .venv, build bmssl, run the whole test suite
#
# .venv gets the pinned CPU stack (torch 2.13.0 CPU, triton 3.6.0, numpy < 2.3). On a machine
# whose python3 already has a CUDA torch (the GPU machine), .venv instead sees that torch
# (--system-site-packages) and the CUDA kernels are built too.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_STACK := torch==2.13.0 triton==3.6.0 "numpy<2.3"
TOOLS := setuptools wheel ninja tqdm pillow matplotlib pytest hypothesis expecttest "cmake>=3.31"
HAVE_CUDA_TORCH := $(shell $(PYTHON) -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null && echo 1)

.PHONY: demo test build bench clean

$(VENV)/.ready:
ifeq ($(HAVE_CUDA_TORCH),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q $(TOOLS) || echo "pip could not install $(TOOLS); using what the system has"
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CPU_STACK) $(TOOLS)
endif
	touch $@

# The extension is rebuilt only when what it is built from changed (a stamp in .venv); the Python
# files need no rebuild (an editable install).
BUILD_INPUTS := $(shell find csrc kernels -type f 2>/dev/null) setup.py pyproject.toml CMakeLists.txt

build: $(VENV)/.built

$(VENV)/.built: $(VENV)/.ready $(BUILD_INPUTS)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The main job: bmssl's info, a short BMSSL run on the embedded glyphs set (alphabets held out),
# then the few-shot table of that run against the scratch baseline.
DEMO_RUN ?= runs/demo-glyphs-bmssl
demo: build
	$(VENV)/bin/bmssl info
	rm -rf $(DEMO_RUN)
	$(VENV)/bin/bmssl train --method bmssl --data glyphs --out $(DEMO_RUN) --steps 100 -N 20 -K 4 \
	    --M1 1 --M2 3 -L 2 --delta 2 --hidden 16 --warmup 10 --outer-lr 2e-3 --checkpoint-every 50
	$(VENV)/bin/bmssl eval --checkpoint $(DEMO_RUN) --method scratch --settings 5w1s 5w5s \
	    --episodes 300 --protocols proto --json $(DEMO_RUN)/eval.json

test: build
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

bench: build
	$(PY) bench/bench_kl_bootstrap.py --out bench/results/tmp/kl_bootstrap

clean:  # the glyph cache (~/.cache/bmssl) is kept: it is rebuilt from fonts on demand
	rm -rf $(VENV) build bmssl/*.so bmssl/_build_config.json *.egg-info $(DEMO_RUN)
