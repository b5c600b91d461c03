#!/usr/bin/env bash
# The GPU check, in one command on a machine with a CUDA GPU (about 5 minutes on one H200):
#   1. the `gpu`-marked tests: the loss's bf16 GEMMs against fp64 on the GPU, a training run per precision (bf16
#      autocast; fp16 autocast with its loss scale) with checkpoint, export and evaluation on the GPU, pinned loader
#      batches;
#   2. scripts/bench_loss.py on the GPU: open_clip's ClipLoss against Tessera's tiled loss (its torch path and its
#      fused Triton kernel; Inf-CL where installed), bf16, up to B = 262,144; then the errors against fp64 at 65,536;
#   3. whether the loader keeps the GPU fed: ViT-B/32 (configs/vit-b-32.yaml, bf16, batch 256) trained for 150 steps
#      on 4,096 photo-like JPEGs of 256-1024 px, data.num_workers=auto; data_wait (the share of step time spent
#      waiting for a batch) of its last logged windows, and their samples/s.
# It installs nothing beyond the project (offline: no build isolation): where the running Python already has Tessera's dependencies (a GPU image
# with them) it uses that Python, else it makes .venv as scripts/test.sh does. Output goes to runs/gpu_check.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if "$PY" -c 'import open_clip, deepspeed, webdataset, peft, torch_geometric, pytest' 2>/dev/null; then
    "$PY" -c 'import tessera.losses' 2>/dev/null || "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
else
    export TESSERA_EXTRAS=dev
    source scripts/setup_env.sh
    PY=python
fi
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: torch sees no CUDA GPU")'
"$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(), "torch", torch.__version__)'
OUT="${GPU_CHECK_OUT:-runs/gpu_check}"
mkdir -p "$OUT"
status=0
echo "== gpu-marked tests"
"$PY" -m pytest -q -m gpu -rA tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt" || status=1
echo "== bench_loss on the GPU (bf16)"
"$PY" scripts/bench_loss.py --device cuda --dtype bf16 --batches 8192,32768,65536,262144 --repeats 3 \
    --impls open_clip,tessera,triton,inf_cl \
    --timeout 240 --out "$OUT/bench_loss" 2>&1 | tee "$OUT/bench_loss.txt" || status=1
echo "== the loss's error against fp64 (bf16 features)"
"$PY" scripts/bench_loss.py --device cuda --dtype bf16 --precision --batches 65536 \
    --out "$OUT/bench_loss" 2>&1 | tee "$OUT/precision.txt" || status=1
echo "== data_wait: ViT-B/32 bf16, batch 256, data.num_workers=auto, photos of 256-1024 px"
"$PY" scripts/bench_loader.py --samples 4096 --make-shards "$OUT/photos" 2>&1 | tail -2
timeout 420 "$PY" -m tessera.train.pretrain --config configs/vit-b-32.yaml \
    "data.train=$OUT/photos/photos-{000000..000031}.tar" train.steps=150 train.log_every=25 train.ckpt_every=-1 \
    eval.every=0 "output_dir=$OUT/vit-b-32" 2>&1 | tail -5 | tee "$OUT/feed.txt" || status=1
"$PY" - "$OUT/vit-b-32/metrics.jsonl" <<'PYEOF' 2>&1 | tee -a "$OUT/feed.txt" || status=1
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if '"train"' in x]
for r in rows:
    print(f"step {r['step']}: data_wait {r['data_wait']:.3f}, {r['samples_per_s']:.0f} samples/s")
late = rows[-3:]
wait = sum(r["data_wait"] for r in late) / len(late)
print(f"data_wait over the last {len(late)} windows: {wait:.3f} (target < 0.05)")
PYEOF
exit $status
