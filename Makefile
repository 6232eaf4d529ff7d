# One venv at the repo root; every target creates what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed

SPECS := $(wildcard data_specs/*.yaml)

.PHONY: setup demo data train compare qa-sweep test test-all lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# CPU build from the local wheel first: a bare `torch` requirement would pull a CUDA build.
	$(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[dev,mujoco,agent,ray,minari]"
	touch $(STAMP)

# Demo trajectories are generated locally (gymnasium rollouts), then built into stores.
data/raw/.generated: scripts/make_demo_data.py | $(STAMP)
	$(PYTHON) scripts/make_demo_data.py --out data/raw
	touch $@

data/raw/qa/.generated: scripts/make_qa_demo_data.py | $(STAMP)
	$(PYTHON) scripts/make_qa_demo_data.py --out data/raw/qa
	touch $@

# The harder QA demo: more documents (a dev split of over 1,000 questions), other planted
# facts (seed 1), and 3 distractor facts per document about near-miss creatures.
data/raw/qa-hard/.generated: scripts/make_qa_demo_data.py | $(STAMP)
	$(PYTHON) scripts/make_qa_demo_data.py --out data/raw/qa-hard --docs 2000 --distractors 3 --seed 1
	touch $@

# MuJoCo (Hopper-v5) logs in the D4RL style; needs the `mujoco` extra, which setup installs.
data/raw/hopper/.generated: scripts/make_mujoco_data.py scripts/make_demo_data.py | $(STAMP)
	$(PYTHON) scripts/make_mujoco_data.py --out data/raw
	touch $@

# Language-agent episodes: textgrid-v0 played by its scripted teachers (trainer/envs).
data/raw/agent/.generated: scripts/make_agent_data.py trainer/envs/*.py | $(STAMP)
	$(PYTHON) scripts/make_agent_data.py --out data/raw
	touch $@

data: $(STAMP) data/raw/.generated data/raw/qa/.generated data/raw/qa-hard/.generated data/raw/hopper/.generated data/raw/agent/.generated
	@for spec in $(SPECS); do \
		$(PYTHON) -m pipeline.build $$spec --out stores || exit 1; \
	done

# Training: CONFIG picks the run, ARGS overrides keys (e.g. ARGS="seed=1 stages.1.steps=5000").
CONFIG ?= configs/pendulum-bc-iql.yaml
ARGS ?=
train: data
	$(PYTHON) -m trainer.train $(CONFIG) $(ARGS)

compare: $(STAMP)
	$(PYTHON) -m trainer.compare runs/*/ --out runs/compare.png

# The demo: build the demo stores, then BC -> IQL on Pendulum and compare.
demo: data
	$(PYTHON) -m trainer.train configs/pendulum-bc-iql.yaml --overwrite
	$(PYTHON) -m trainer.compare runs/pendulum-bc-iql --out runs/compare.png

# F1 against the fraction of segments read across lambda, beside the simple halting rules:
# per seed (SEEDS) one supervised reader and one hybrid run per lambda (LAMBDAS),
# runs/qa-sweep/qa-sweep.png and the tables in Markdown.
LAMBDAS ?= 0,0.005,0.01,0.02,0.05,0.1,0.2
SEEDS ?= 0
qa-sweep: data
	$(PYTHON) scripts/qa_sweep.py --lambdas $(LAMBDAS) --seeds $(SEEDS) --out runs/qa-sweep $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-all: $(STAMP)
	$(PYTHON) -m pytest -m ""

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy pipeline trainer data_specs scripts

bench: data
	$(PYTHON) scripts/bench_build.py
	$(PYTHON) scripts/bench_ray_build.py
	$(PYTHON) scripts/bench_segments.py
	$(PYTHON) scripts/bench_sampler.py
	$(PYTHON) scripts/bench_parts.py
	$(PYTHON) scripts/bench_minari_export.py
	$(PYTHON) scripts/bench_minari_import.py
	$(PYTHON) scripts/bench_train.py
	$(PYTHON) scripts/bench_ddp.py
	$(PYTHON) scripts/bench_qa.py
	$(PYTHON) scripts/bench_sft.py
	$(PYTHON) scripts/bench_rl.py

clean:
	rm -rf stores runs data/raw .pytest_cache .mypy_cache .ruff_cache
