#!/usr/bin/env bash
# The CUDA path, checked and timed on a machine with an NVIDIA GPU (the README's "On a GPU" figures).
#
#   bash scripts/cuda_check.sh LIKE OUT STEP...
#
# LIKE: a model folder with config and tokenizer (weights are not read: the timed models are random, see
# scripts/random_model.py). OUT: where logs and bench JSON go. Steps, run in the order given:
#   tests   the cache, decode and generation tests with their models on cuda
#   smol    bench LIKE's shape (fp32): eager, compiled with CUDA graphs, compiled without them
#   smol-q  bench LIKE's shape: compiled int8 weights, compiled bf16
#   7b      bench a Llama-2-7B shape (bf16): eager and compiled
#   7b-compiled   the same, compiled only
#   7b-profile    scripts/lab/profile_decode.py on that shape: the whole decode step, the compiled step alone, the bound
#   7b-train      training throughput on that shape (bf16 weights, fp32 LoRA, bf16 autocast, gradient checkpointing):
#                 20 steps on `flashback qa --prepare` data (offline, the default tokenizer) in one process, then in
#                 one process per GPU under torchrun when there are two or more; target tokens/s and peak memory
set -euo pipefail
like=$1
out=$2
shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
lengths=${LENGTHS:-2048,4096}

bench() { # name, model, flags...
    local name=$1 model=$2
    shift 2
    echo "== bench $name: $*"
    python -m flashback.cli bench --model "$model" --device cuda --context-lengths "$lengths" --repeats 3 --no-lora \
        --json "$out/bench-$name.json" "$@" 2>"$out/bench-$name.err" | tee "$out/bench-$name.txt" ||
        { tail -20 "$out/bench-$name.err"; return 1; }
}

for step in "$@"; do
    case $step in
    tests)
        FLASHBACK_TEST_DEVICE=cuda python -m pytest -p no:cacheprovider -p no:warnings \
            tests/test_cache.py tests/test_decode.py tests/test_generate.py 2>&1 | tee "$out/tests-cuda.log" | tail -15 ||
            echo "== tests failed on cuda (log: $out/tests-cuda.log)"
        ;;
    smol | smol-q)
        [ -d /tmp/random-like ] || python scripts/random_model.py --like "$like" --out /tmp/random-like --device cuda
        if [ "$step" = smol ]; then
            bench smol-eager /tmp/random-like --compile off
            bench smol-compile /tmp/random-like --compile
            FLASHBACK_CUDA_GRAPHS=0 bench smol-compile-nographs /tmp/random-like --compile
        else
            bench smol-int8 /tmp/random-like --compile --quantize int8
            bench smol-bf16 /tmp/random-like --compile --dtype bfloat16
        fi
        ;;
    7b | 7b-compiled | 7b-profile)
        [ -d /tmp/random-7b ] || python scripts/random_model.py --like "$like" --out /tmp/random-7b --shape llama2-7b \
            --dtype bfloat16 --device cuda
        case $step in
        7b)
            bench 7b-eager /tmp/random-7b --compile off --dtype bfloat16
            bench 7b-compile /tmp/random-7b --compile --dtype bfloat16
            ;;
        7b-compiled) bench 7b-compile /tmp/random-7b --compile --dtype bfloat16 ;;
        7b-profile)
            for n in 2048 4096; do
                python scripts/lab/profile_decode.py --model /tmp/random-7b --device cuda --dtype bfloat16 --compile \
                    --context $n 2>/dev/null | tee -a "$out/profile-7b.jsonl"
            done
            ;;
        esac
        ;;
    7b-train)
        [ -d /tmp/random-7b ] || python scripts/random_model.py --like "$like" --out /tmp/random-7b --shape llama2-7b \
            --dtype bfloat16 --device cuda
        [ -f /tmp/qa-data/manifest.json ] || python -m flashback qa --prepare /tmp/qa-data
        train=(train --model /tmp/random-7b --data /tmp/qa-data --device cuda --dtype bfloat16 --autocast bfloat16
            --gradient-checkpointing --max-steps 20 --warmup-steps 2 --eval-every 1000 --save-every 1000
            --max-val-segments 1 --quiet)
        echo "== train 7b, 1 process"
        rm -rf "$out/train-7b-1"
        /usr/bin/time -v python -m flashback "${train[@]}" --out "$out/train-7b-1" 2>"$out/train-7b-1.err" |
            tee "$out/train-7b-1.json"
        python -c "import torch; print(torch.cuda.get_device_name())" >>"$out/train-7b-1.json"
        gpus=$(python -c "import torch; print(torch.cuda.device_count())")
        if [ "$gpus" -ge 2 ]; then
            echo "== train 7b, $gpus processes"
            rm -rf "$out/train-7b-$gpus"
            torchrun --standalone --nproc-per-node "$gpus" -m flashback "${train[@]}" --out "$out/train-7b-$gpus" \
                2>"$out/train-7b-$gpus.err" | tee "$out/train-7b-$gpus.json"
        else
            echo "== one GPU: the multi-process run needs two or more"
        fi
        ;;
    *)
        echo "unknown step $step" >&2
        exit 2
        ;;
    esac
done
