#!/usr/bin/env bash
# The GPU checks, as one prepared script (about 8 minutes on one recent GPU):
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default: ${OUT:-/tmp/jestcurate-gpu}
#
# 1. ViT-B-32 model-only vs `score` in bf16, --decode pil and --decode torch, on generated
#    256 px and 512 px shards (benchmarks/throughput.py, two interleaved rounds), with GPU
#    utilisation sampled by nvidia-smi through each step (model-only and score runs alike);
# 2. clip-retrieval `inference` on the same kind of shards, if its virtual environment exists
#    (benchmarks/peer_clip_retrieval.py; GPU machines here have no internet to install it);
# 3. `select --method jest` at the paper's b = 32,768, ratio 0.2, on CUDA;
# 4. `dedup` with faiss on the GPU.
# Every step has its own time limit, so one slow step cannot eat the others' time. Results:
# OUT_DIR/gpu.json (one object per step) and OUT_DIR/gpu.md (a markdown table).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/jestcurate-gpu}}"
mkdir -p "$out"
py="${PYTHON:-python}"
results="$out/gpu.jsonl"
: >"$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu-name.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run it, keep its last JSON line, note a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name" >&2
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 \
        >"$out/util-$name.txt" 2>/dev/null &
    local smi=$!
    local began=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    kill "$smi" 2>/dev/null
    local line
    line=$(grep '^{' "$out/$name.log" | tail -1)
    "$py" - "$name" "$rc" "$((SECONDS - began))" "$out/util-$name.txt" "${line:-null}" >>"$results" <<'EOF'
import json, sys
name, rc, seconds, util_file, line = sys.argv[1:]
util = [int(v) for v in open(util_file).read().split() if v.isdigit()]
busy = [u for u in util if u > 0]
print(json.dumps({
    "step": name, "rc": int(rc), "seconds": int(seconds),
    "gpu_util_mean": round(sum(busy) / len(busy), 1) if busy else None,
    "result": json.loads(line) if line != "null" else None,
}))
EOF
}

# The corpora are written first, one shard per process, outside every step's time limit
# (a 512 px synthetic sample takes tens of ms to draw on one core).
for px in 256 512; do
    if [ ! -f "$out/pool-$px/00007.tar" ]; then
        for i in 0 1 2 3 4 5 6 7; do
            "$py" -m jestcurate synth "$out/pool-$px" --shards 1 --samples 1024 \
                --image-size "$px" --noise noisy --first-shard "$i" >/dev/null &
        done
        wait
    fi
done

for px in 256 512; do
    for decode in pil torch; do
        step "score-vitb32-${px}px-${decode}" 100 "$py" benchmarks/throughput.py \
            --model ViT-B-32 --precision bf16 --device cuda --decode "$decode" \
            --image-size "$px" --shards 8 --samples 1024 --batch-size 256 --rounds 2 \
            --pool "$out/pool-$px"
    done
done
peer="${PEER_VENV:-/tmp/jestcurate-peer-venv}"
if [ -x "$peer/bin/clip-retrieval" ]; then
    step "clip-retrieval-vitb32-256px" 120 "$py" benchmarks/peer_clip_retrieval.py \
        --models ViT-B-32 --shards 8 --samples 512 --batch-size 256 --workers 8 --gpu \
        --peer-venv "$peer" --workdir "$out/peer"
else
    echo "{\"step\": \"clip-retrieval\", \"rc\": null, \"skipped\": \"no venv at $peer\"}" >>"$results"
fi
step "select-jest-b32768" 120 "$py" benchmarks/select_speed.py --rows 1000000 --dim 512 \
    --batch-size 32768 --ratio 0.2 --max-steps 4 --workdir "$out/select" \
    --select-args "--device cuda"
step "dedup-faiss-gpu" 90 "$py" benchmarks/dedup_speed.py --rows 1000000 --dim 512 \
    --device cuda --workdir "$out/dedup"

"$py" - "$results" "$out/gpu-name.txt" >"$out/gpu.md" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"GPU: {open(sys.argv[2]).read().strip()}\n")
print("| step | exit | seconds | GPU busy (mean %) | result |")
print("| --- | --- | --- | --- | --- |")
for r in rows:
    res = r.get("result") or {}
    keys = ("model_only_samples_per_s", "score_steady_samples_per_s", "steady_ratio_of_medians",
            "jestcurate_wall_samples_per_s", "clip_retrieval_wall_samples_per_s",
            "candidates_per_s", "total_s", "peak_rss_mib")
    shown = ", ".join(f"{k}={res[k]}" for k in keys if k in res) or r.get("skipped", "")
    print(f"| {r['step']} | {r['rc']} | {r.get('seconds', '')} | {r.get('gpu_util_mean')} | {shown} |")
EOF
{ echo "["; paste -sd, "$results"; echo "]"; } >"$out/gpu.json"
cat "$out/gpu.md"
