#!/usr/bin/env bash
# The GPU checks in one command, on a machine with an NVIDIA GPU, from the repository root or anywhere:
#
#   scripts/gpu_check.sh                      # uses .venv (make setup)
#   PYTHON=/path/to/cuda-env/bin/python scripts/gpu_check.sh
#
# `make setup` pins a CPU build of torch; if that is what .venv holds, point PYTHON at an
# environment whose torch is a CUDA build (with this project installed: pip install -e '.[dev]').
# Steps: the gpu-marked tests, `fedsplit bench generate` on the default model, then the
# LLaMA-2-7B shape in bf16 (split vs unsplit tokens/s, bytes per token) and `fedsplit bench
# memory` for it (client vs server, RSS and CUDA memory). Every step has a time limit and the
# whole script stays under 8 minutes; figures go to results/gpu/, logs beside them, a summary
# is printed at the end. Exit status: 0 when every step passed.
set -u

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-results/gpu}
DEADLINE=$((SECONDS + 470)) # every step's limit is cut to what is left of 7 min 50 s

if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: no Python at $PYTHON; run make setup or set PYTHON=/path/to/python" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import fedsplit' 2>/dev/null; then
    echo "error: $PYTHON cannot import fedsplit; install it there: $PYTHON -m pip install -e '.[dev]'" >&2
    exit 2
fi
if ! build=$("$PYTHON" -c 'import sys, torch
print(torch.__version__, "CUDA", torch.version.cuda)
sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null); then
    echo "error: torch in $PYTHON ($build) sees no CUDA GPU; these checks need one." >&2
    echo "       make setup installs a CPU build of torch: run this on a GPU machine with" >&2
    echo "       PYTHON=/path/to/env-with-cuda-torch/bin/python scripts/gpu_check.sh" >&2
    exit 2
fi

mkdir -p "$OUT"
"$PYTHON" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")'

failed=()
# step NAME BUDGET_SECONDS COMMAND...: run with the smaller of its budget and the time left; log to $OUT/NAME.log
step() {
    local name=$1 budget=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    local limit=$((budget < left ? budget : left))
    if [ "$limit" -lt 20 ]; then
        echo "skip  $name: out of time (the script stays under 8 minutes)"
        failed+=("$name")
        return 1
    fi
    local start=$SECONDS rc=0
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "ok    $name ($((SECONDS - start)) s)"
        return 0
    fi
    if [ "$rc" -eq 124 ]; then
        echo "FAIL  $name: over its ${limit} s limit; last lines of $OUT/$name.log:"
    else
        echo "FAIL  $name (exit $rc, $((SECONDS - start)) s); last lines of $OUT/$name.log:"
    fi
    tail -n 15 "$OUT/$name.log" | sed 's/^/      /'
    failed+=("$name")
    return 1
}

FEDSPLIT=("$PYTHON" -m fedsplit.cli.main)
SEVEN_B=llama2-7b-shape

step tests 90 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider
step generate 80 "${FEDSPLIT[@]}" bench generate --device cuda --json "$OUT/generate.json"
# The 7B shape's random weights are written once (13.5 GB in bf16) into the model cache.
if step build-7b 130 "$PYTHON" -c "from fedsplit.model.loading import resolve_checkpoint; resolve_checkpoint('$SEVEN_B')"; then
    step generate-7b 90 "${FEDSPLIT[@]}" bench generate --device cuda --dtype bf16 --model "$SEVEN_B" \
        --new-tokens 32 --context 256 --no-cache-tokens 4 --json "$OUT/generate-7b.json"
    step memory-7b 100 "${FEDSPLIT[@]}" bench memory --device cuda --dtype bf16 --model "$SEVEN_B" \
        --json "$OUT/memory-7b.json"
else
    echo "skip  generate-7b, memory-7b: no $SEVEN_B weights (build-7b did not finish)"
    failed+=(generate-7b memory-7b)
fi

echo
echo "summary (figures in $OUT/):"
"$PYTHON" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
KEYS = {
    "generate.json": ("model", "device", "dtype", "split_tokens_per_s", "centralized_tokens_per_s", "ratio",
                      "bytes_per_token_up", "bytes_per_token_down", "cache_speedup"),
    "generate-7b.json": ("model", "device", "dtype", "model_gib", "split_tokens_per_s",
                         "centralized_tokens_per_s", "ratio", "centralized_skipped", "bytes_per_token_up",
                         "bytes_per_token_down"),
    "memory-7b.json": ("model", "device", "dtype", "client_gib", "server_gib", "unsplit_gib",
                       "client_cuda_max_allocated_gib", "server_cuda_max_allocated_gib",
                       "unsplit_cuda_max_allocated_gib"),
}
for name, keys in KEYS.items():
    path = out / name
    if not path.exists():
        print(f"  {name}: none (step failed)")
        continue
    figures = json.loads(path.read_text())
    shown = [f"{k} {figures[k]:.4g}" if isinstance(figures[k], float) else f"{k} {figures[k]}"
             for k in keys if k in figures]
    print(f"  {name}: " + "; ".join(shown))
EOF

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]} (total $SECONDS s)"
    exit 1
fi
echo "all GPU checks passed ($SECONDS s)"
