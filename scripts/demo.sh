#!/usr/bin/env bash
# Install Tessera into .venv, build the embedded demo data, pretrain a small image-text CLIP on CPU,
# and evaluate zero-shot retrieval and shape classification on held-out data. Everything lands in runs/demo/.
# Extra arguments are config overrides for the training run, e.g. `bash scripts/demo.sh train.steps=100`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
DATA=runs/demo/data

if [ ! -f "$DATA/sizes.json" ] || [ ! -f "$DATA/classes.json" ]; then
    python -m data.demo --out "$DATA"
fi
# a rerun replaces the previous demo run (the data is kept)
rm -rf runs/demo/checkpoints runs/demo/model runs/demo/eval runs/demo/tensorboard runs/demo/metrics.jsonl
python -m train.pretrain --config configs/demo.yaml "$@"
echo
echo "== standalone evaluation of the exported model (python -m eval.retrieval) =="
python -m eval.retrieval --model runs/demo/model --data "$DATA/val-000000.tar" \
    --query text --target image --out runs/demo/eval/retrieval-cli.json
echo
echo "== zero-shot shape classification of the held-out pictures (python -m eval.zeroshot) =="
python -m eval.zeroshot --model runs/demo/model --data "$DATA/val-000000.tar" --modality image \
    --classes "$DATA/classes.json" --out runs/demo/eval/zeroshot-cli.json
python - <<'PY'
import json
doc = json.load(open("runs/demo/eval/retrieval-cli.json"))
m, c = doc["metrics"], doc["chance"]
print()
for d in ("text_to_image", "image_to_text"):
    print(f"{d}: R@1 {100 * m[d + '_R@1']:.1f}% vs chance {100 * c[d + '_R@1']:.2f}% "
          f"({m[d + '_R@1'] / c[d + '_R@1']:.0f}x chance); R@10 {100 * m[d + '_R@10']:.1f}% vs {100 * c[d + '_R@10']:.1f}%")
skipped = doc["data"]["skipped"]
run = [json.loads(x) for x in open("runs/demo/metrics.jsonl")]
train = [x for x in run if x["kind"] == "train"]
print(f"training: {train[-1]['step']} steps, loss {train[0]['loss']:.2f} -> {train[-1]['loss']:.2f}, "
      f"{train[-1]['samples_per_s']:.0f} samples/s; bad training samples skipped: {train[-1]['data']['skipped']}")
print("outputs: runs/demo/{config.yaml,metrics.jsonl,tensorboard,checkpoints,model,eval}")
PY
