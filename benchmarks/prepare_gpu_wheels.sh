#!/usr/bin/env bash
# Download into .whl/ the wheels benchmarks/gpu_session.sh installs on the GPU machine, which has no
# network: the packages its image lacks (/work/.library/device/KINDS.md lists what it has), for
# CPython 3.12 on manylinux x86_64. All but torchao are pure Python; torchao (the fp8 lever; 0.18.0 loads its
# compiled parts on torch >= 2.11, the GPU machine's, but gpu_session.sh skips them: float8 training is Python)
# is a binary wheel of a few MB.
#
#   bash benchmarks/prepare_gpu_wheels.sh        # then carry ".whl" (and "benchmarks/data") to the device
#
# .whl/ is listed in .git/info/exclude (never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
# datasets (+ dill, multiprocess): run_contrastive's data and the run_clip way's CSV; the rest: the open_clip rows
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 torchao==0.18.0)
mkdir -p .whl
exclude="$(git rev-parse --git-common-dir)/info/exclude"
for path in .whl/ benchmarks/data/; do grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"; done
for wheel in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$wheel"
done
ls -l .whl && du -sh .whl
