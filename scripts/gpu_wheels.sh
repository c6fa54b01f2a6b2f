#!/usr/bin/env bash
# Collect into .whl/ the wheels alignkit, gpu_check.sh and bench_gpu.py need on a GPU node that has PyTorch,
# torchvision, Lightning, timm, numpy, pandas and transformers (hence safetensors, huggingface_hub, tqdm, pillow)
# preinstalled and no package index. Versions are the ones this machine's virtualenv runs (pip freeze).
#   make gpu-wheels            # GPU_PYVER=3.12 by default: the CPython of the GPU node, for regex's compiled wheel
# On the GPU node:  pip install --no-index --no-deps .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
GPU_PYVER=${GPU_PYVER:-3.12}
OUT=.whl
mkdir -p "$OUT"
# wheels for any CPython 3 on x86-64 Linux (py3-none-any; wcwidth's is abi3, cp310 and later)
PURE="hydra-core omegaconf antlr4-python3-runtime open-clip-torch ftfy wcwidth webdataset braceexpand"
pins=$($PY -m pip freeze | awk -F'==' -v want=" $PURE " 'BEGIN{IGNORECASE=1}
  { n=tolower($1); gsub("_","-",n); if (index(tolower(want), " " n " ")) print $0 }')
missing=$(for p in $PURE; do echo "$pins" | grep -qi "^${p//-/[-_]}==" || echo "$p"; done)
if [ -n "$missing" ]; then echo "gpu_wheels: not installed here (run make setup): $missing" >&2; exit 2; fi
# antlr4-python3-runtime 4.9.3 (hydra-core 1.3's pin) is published as an sdist only: build its wheel locally.
for pin in $pins; do
  case "${pin,,}" in
    antlr4-python3-runtime==*) $PY -m pip wheel -q --no-deps -w "$OUT" "$pin" ;;
    *) $PY -m pip download -q --no-deps --only-binary=:all: -d "$OUT" "$pin" ;;
  esac
done
# regex (open_clip's tokenizer dependency) has compiled wheels only. transformers needs it too, so a node with
# transformers has it; for a node without, the wheel for its CPython goes to .whl/optional/ (not in .whl/*.whl,
# whose install would fail on another interpreter):  pip install --no-index --no-deps .whl/optional/*.whl
regex=$($PY -m pip freeze | grep -i '^regex==')
$PY -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
  --python-version "$GPU_PYVER" --implementation cp -d "$OUT/optional" "$regex"
ls -1 "$OUT" "$OUT/optional"
