#!/usr/bin/env bash
# Issue 31's measurements in one GPU session (about 8 minutes on an H200): every JSON goes to $OUT/,
# every table to stdout. Most important first, each part under its own `timeout`, so a hang or a
# crash in one leaves the others standing:
#   1. throughput at batch 256, bf16, vit-bert: ours eager + compiled (blocks-graphs), the HF Trainer
#      way, open_clip eager + compiled (whole model); GPU peak MiB and MiB per sample on every row
#   2. gradient checkpointing off/on: ViT-B/16 + DistilBERT at batch 256 (goal: <= 12 GB)
#   3. GradCache: ViT-B/16 + DistilBERT at batch 4,096 in chunks of 256
#   4. end to end, 1 epoch each: the run_clip.py way vs run_contrastive.py on the Flickr8k subset
# `bash benchmarks/gpu_session.sh levers` runs instead the levers' part (about 7 minutes; parts 1-4 were
# measured on 2026-12-04): ours vit-bert at batch 256, bf16, with no lever, each lever alone and all of
# them (fused Triton LayerNorm/GELU, fp8 matmuls through torchao, the whole step as one CUDA graph),
#   5a. eager and 5b. blocks compiled.
#
# Before the session, on a machine with network (once):
#   bash benchmarks/prepare_gpu_wheels.sh        # .whl/: datasets, open_clip and their missing deps
#   bash benchmarks/make_flickr_subset.sh        # benchmarks/data/flickr8k_test: 1,000 test images
# Then run it with carry [".whl", "benchmarks/data"]:
#   bash benchmarks/gpu_session.sh
# On a CPU, `--cpu-smoke` runs the same parts at toy shapes and 2 steps (a few minutes), to catch typos;
# `--cpu-smoke levers` the levers' part (Triton kernels in its interpreter, fp8 in torchao's emulation).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1 && shift
PARTS="${1:-peers}"  # peers: parts 1-4; levers: part 5
OUT="${OUT:-benchmarks/results/gpu_session}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
PY=python3

if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# each benchmark row runs in a child started from its script's path: it finds this checkout's packages here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("transformers", "timm", "accelerate", "pyarrow", "fsspec", "datasets", "open_clip", "triton", "torchao"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # a missing package costs its rows only
        print(name, "NOT IMPORTABLE:", type(err).__name__, err)
EOF

if (( SMOKE )); then
    SHAPE=(--size tiny --image_size 32 --seq_len 8 --steps 2 --warmup 1 --threads 2)
    BATCH=8; BIG_BATCH=16; CHUNK=4; COMPILE=off  # compiling on a CPU takes minutes; plan() is unit-tested
    FEW=(--steps 2 --warmup 1); FEWER=(--steps 2 --warmup 1)
    DATA=/tmp/gpu_session_smoke/flickr
    rm -rf /tmp/gpu_session_smoke
    $PY -c "from pathlib import Path; from tests.test_data_flickr8k import make_official; make_official(Path('$DATA'), n=12, splits=(0, 0, 12))"
    E2E=(--architecture vit-bert-tiny --splits 6,3,3 --batch_size 4 --precision fp32 --max_steps 2 --workers 0)
    T1=600; T2=300; T3=300; T4=600; OURS_T=300
    LEVER_SHAPE=(--size tiny --image_size 32 --seq_len 8 --batch_size 8 --steps 1 --warmup 2 --threads 2)
    LEVER_COMPILE=off; T5A=900; T5B=0; LEVER_ROW_T=400  # compiling on a CPU takes minutes: 5b is left out
    export TRITON_INTERPRET=1  # the Triton kernels run in triton's interpreter (slowly) on a CPU
else
    SHAPE=(--size base --image_size 224 --seq_len 32 --steps 20 --warmup 5)
    BATCH=256; BIG_BATCH=4096; CHUNK=256; COMPILE=off,blocks-graphs
    FEW=(--steps 5 --warmup 2); FEWER=(--steps 3 --warmup 1)  # a step at batch 4,096 is ~16 of batch 256
    DATA=benchmarks/data/flickr8k_test
    E2E=(--architecture vit-bert --splits 800,100,100 --batch_size 256 --precision bf16 --epochs 1 --workers 8)
    T1=220; T2=45; T3=60; T4=140; OURS_T=90  # with the install: about 8 minutes at most
    LEVER_SHAPE=(--size base --image_size 224 --seq_len 32 --batch_size 256 --steps 10 --warmup 4)
    LEVER_COMPILE=blocks; T5A=150; T5B=270; LEVER_ROW_T=80  # 5 rows each; with the install about 7.5 minutes
fi

part() {  # part NAME SECONDS COMMAND...: run it under a timeout and say how it ended
    local name=$1 seconds=$2
    shift 2
    echo; echo "=== $name (at most $seconds s): $*"
    local started=$SECONDS
    timeout --kill-after=10 "$seconds" "$@"
    echo "=== $name: exit status $?, $((SECONDS - started)) s"
}

if [[ "$PARTS" == "levers" ]]; then
    # torchao's compiled extensions are not needed by float8 training (Python + torch._scaled_mm): never load them
    export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
    LEVERS=(--pair vit-bert --mode full --precision bf16 --levers fused-triton,fp8,step-graph "${LEVER_SHAPE[@]}"
            --row_timeout "$LEVER_ROW_T")
    part "5a levers, eager" "$T5A" $PY -m benchmarks.throughput "${LEVERS[@]}" --compile off --out "$OUT/throughput_levers_eager.json"
    if (( T5B > 0 )); then
        part "5b levers, blocks compiled" "$T5B" \
            $PY -m benchmarks.throughput "${LEVERS[@]}" --compile "$LEVER_COMPILE" --out "$OUT/throughput_levers_compiled.json"
    fi
    echo; echo "=== done; JSON files:"; ls -l "$OUT"
    exit 0
fi

part "1 throughput: ours, HF Trainer, open_clip" "$T1" \
    $PY -m benchmarks.throughput --pair vit-bert --mode full --precision bf16 --compile "$COMPILE" --baseline --open_clip \
        --batch_size "$BATCH" "${SHAPE[@]}" --row_timeout $((T1 / 2)) --out "$OUT/throughput_peers.json"

part "2 gradient checkpointing (vit-distilbert)" "$T2" \
    $PY -m benchmarks.throughput --pair vit-distilbert --mode full --precision bf16 --compile off \
        --gradient_checkpointing off,on --batch_size "$BATCH" "${SHAPE[@]}" "${FEW[@]}" \
        --out "$OUT/throughput_checkpointing.json"

part "3 GradCache at batch $BIG_BATCH (vit-distilbert)" "$T3" \
    $PY -m benchmarks.throughput --pair vit-distilbert --mode full --precision bf16 --compile off \
        --grad_cache_chunk "$CHUNK" --batch_size "$BIG_BATCH" "${SHAPE[@]}" "${FEWER[@]}" \
        --out "$OUT/throughput_grad_cache.json"

if [[ -d "$DATA/Flicker8k_Dataset" ]]; then
    rm -rf /tmp/run_clip_way  # its re-split folder links the images: a second run needs a fresh one
    part "4 end to end: run_clip way vs run_contrastive" "$T4" \
        $PY -m benchmarks.run_clip_way --data "$DATA" "${E2E[@]}" --way_timeout "$OURS_T" --workdir /tmp/run_clip_way \
            --out "$OUT/run_clip_way.json"
else
    echo "=== 4 skipped: no $DATA (run benchmarks/make_flickr_subset.sh and carry benchmarks/data)"
fi
echo; echo "=== done; JSON files:"; ls -l "$OUT"
