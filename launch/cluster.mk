# Cluster targets, included by the top Makefile (which defines BIN and `setup`). See launch/README.md.
#
#   make launch-cluster                      Ray head on this machine (127.0.0.1), dashboard on loopback
#   make launch-cluster LOCAL_WORKERS=1      ... plus a second Ray node on this machine
#   make launch-cluster HEAD_IP=10.0.0.1 WORKER_IPS="10.0.0.2 10.0.0.3"   SSH hosts, via `ray up launch/local.yaml`
#   make cluster-status / make down
#   make submit CONFIG=configs/demo.yaml OVERRIDES="label.k=20 distill.epochs=2"
#   make jobs / make logs JOB=<id> / make stop JOB=<id>
#
# Cloud clusters start with `ray up launch/aws.yaml` / `launch/gcp.yaml` or `kubectl apply -f launch/kuberay-*.yaml`;
# `make submit RAY_ADDRESS=...` then works through the dashboard tunnel or port-forward.

.PHONY: launch-cluster down cluster-status submit jobs logs stop

HEAD_IP ?= 127.0.0.1
WORKER_IPS ?=
HOSTS_FILE ?=
SSH_USER ?= $(shell id -un)
SSH_KEY ?= ~/.ssh/id_ed25519
LOCAL_WORKERS ?= 0
NUM_CPUS ?=
RAY_PORT ?= 6379
DASHBOARD_PORT ?= 8265
RAY_START_ARGS ?=
# A dedicated temp dir: `make down` stops the Ray processes of this dir only, never another Ray on the machine.
RAY_TEMP_DIR ?= /tmp/dd-dist-ray
# Ray's internal ports listen on every interface, so token auth (~/.ray/auth_token) is on unless set to disabled.
RAY_AUTH_MODE ?= token
RAY_ADDRESS ?= http://127.0.0.1:$(DASHBOARD_PORT)
CONFIG ?= configs/demo.yaml
OVERRIDES ?=
JOB ?=

CLUSTER = RAY_AUTH_MODE=$(RAY_AUTH_MODE) $(BIN)/python launch/cluster.py --temp-dir $(RAY_TEMP_DIR) --auth $(RAY_AUTH_MODE)
RAY_JOB = RAY_AUTH_MODE=$(RAY_AUTH_MODE) $(BIN)/ray job

launch-cluster: setup
	$(CLUSTER) up --head-ip $(HEAD_IP) --worker-ips "$(WORKER_IPS)" $(if $(HOSTS_FILE),--hosts-file $(HOSTS_FILE)) \
		--ssh-user $(SSH_USER) --ssh-key $(SSH_KEY) --local-workers $(LOCAL_WORKERS) $(if $(NUM_CPUS),--num-cpus $(NUM_CPUS)) \
		--port $(RAY_PORT) --dashboard-port $(DASHBOARD_PORT) --start-args="$(RAY_START_ARGS)"

down: setup
	$(CLUSTER) down

cluster-status: setup
	$(CLUSTER) status

# Exits non-zero unless the job SUCCEEDED; Ctrl-C detaches and leaves the job running.
submit: setup
	RAY_AUTH_MODE=$(RAY_AUTH_MODE) $(BIN)/python launch/submit.py --address $(RAY_ADDRESS) -c $(CONFIG) -- $(OVERRIDES)

jobs: setup
	RAY_AUTH_MODE=$(RAY_AUTH_MODE) $(BIN)/ray list jobs --address $(RAY_ADDRESS)

logs: setup
	@test -n "$(JOB)" || { echo "usage: make logs JOB=<job id>" >&2; exit 2; }
	$(RAY_JOB) logs --address $(RAY_ADDRESS) --follow $(JOB)

stop: setup
	@test -n "$(JOB)" || { echo "usage: make stop JOB=<job id>" >&2; exit 2; }
	$(RAY_JOB) stop --address $(RAY_ADDRESS) $(JOB)
