#!/usr/bin/env bash
# One call on a GPU node with PyTorch preinstalled and no package index (after `make gpu-wheels` on a machine
# with one): install .whl/, run gpu_check.sh (4 checks), then bench_gpu.py (bare loop vs alignkit at batch 256 and
# 1,024, MFU, peak memory, open_clip_train and the end-to-end loader). About 6 minutes on one H200.
#   PYTHON=python3 bash scripts/gpu_session.sh          # logs under $OUT (or /tmp/alignkit-gpu-session)
#   BENCH_ARGS="--compile" bash scripts/gpu_session.sh  # extra bench_gpu.py flags
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-/tmp/alignkit-gpu-session}
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps .whl/*.whl || exit 3
  $PY -c "import regex" 2> /dev/null || $PY -m pip install -q --no-index --no-deps .whl/optional/*.whl || exit 3
else
  echo "gpu_session: no .whl/ here (make gpu-wheels on a machine with an index); using what is installed" >&2
fi
$PY -c "import hydra, open_clip, webdataset, lightning, torch; print('gpu_session: torch', torch.__version__, \
'lightning', lightning.__version__, 'open_clip', open_clip.__version__)" || exit 3
rc=0
PYTHON=$PY GPU_CHECK_DIR="$LOGS/gpu_check" timeout 260 bash scripts/gpu_check.sh 2>&1 | tee "$LOGS/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
(cd scripts && timeout 330 $PY bench_gpu.py --steps 30 --warmup 8 --peer-samples 8192 ${BENCH_ARGS:-}) 2>&1 \
  | grep -v "it/s\]" | tee "$LOGS/bench_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
echo "gpu_session: done (rc=$rc); logs in $LOGS"
exit $rc
