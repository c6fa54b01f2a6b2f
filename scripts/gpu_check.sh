#!/usr/bin/env bash
# GPU check (< 5 minutes on one node): bf16 mixed precision, DDP over every GPU present, FSDP with the frozen
# teacher, cache-and-recompute accumulation, and a few CLIP-Refine steps on a randomly initialised ViT-B-32.
#   bash scripts/gpu_check.sh            # prints one PASS/FAIL line per check and a summary table
# Runs offline (random init, synthetic pairs); writes under ${GPU_CHECK_DIR:-/tmp/alignkit-gpu-check}.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
OUT=${GPU_CHECK_DIR:-/tmp/alignkit-gpu-check}
rm -rf "$OUT"; mkdir -p "$OUT"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo "gpu_check: no CUDA device visible" >&2; exit 2; fi
$PY -c "import torch; print('gpu_check:', torch.__version__, torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), 'bf16', torch.cuda.is_bf16_supported())"

# ViT-B-32 random init, synthetic 224px pairs, CLIP-Refine losses (RaFA + HyCD with the frozen teacher).
COMMON=(+experiment=clip_refine encoder.model=ViT-B-32 encoder.pretrained=null data=synthetic
        data.synthetic_image_size=224 data.num_samples=4096 data.batch_size=64 data.num_workers=4
        trainer.max_steps=6 trainer.log_every_n_steps=1 trainer.precision=bf16-mixed export=false
        "paths.log_dir=$OUT" logger=csv)
declare -A RESULT
check() {  # name, overrides...
  local name=$1; shift
  local t0=$SECONDS
  if timeout 240 $PY train.py "${COMMON[@]}" "run_id=$name" "$@" > "$OUT/$name.log" 2>&1 \
     && $PY - "$OUT" "$name" <<'PY'
import json, sys, pathlib, math
run = next(pathlib.Path(sys.argv[1]).glob(f"*/runs/{sys.argv[2]}"))
s = json.loads((run / "summary.json").read_text())
loss = s["metrics"].get("train/loss", float("nan"))
assert s["global_step"] == 6 and math.isfinite(loss), s
print(f"  global_step={s['global_step']} train/loss={loss:.4f}")
PY
  then RESULT[$name]="PASS $((SECONDS - t0))s"; else RESULT[$name]="FAIL $((SECONDS - t0))s (log: $OUT/$name.log)"; tail -n 30 "$OUT/$name.log"; fi
  echo "gpu_check: $name ${RESULT[$name]}"
}

check bf16_1gpu trainer=gpu trainer.devices=1
if [ "$NGPU" -gt 1 ]; then
  check ddp_all_gpus trainer=ddp trainer.accelerator=gpu "trainer.devices=$NGPU"
  check fsdp_teacher trainer=fsdp "trainer.devices=$NGPU"
else
  check ddp_all_gpus trainer=ddp trainer.accelerator=gpu trainer.devices=1
  check fsdp_teacher trainer=fsdp trainer.devices=1
fi
check cache_recompute trainer=gpu trainer.devices=1 module.accumulation=cache_recompute module.micro_batch_size=16

echo "gpu_check summary ($NGPU GPU(s)):"
fail=0
for k in bf16_1gpu ddp_all_gpus fsdp_teacher cache_recompute; do
  echo "  $k: ${RESULT[$k]}"; [[ ${RESULT[$k]} == PASS* ]] || fail=1
done
exit $fail
