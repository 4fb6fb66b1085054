#!/usr/bin/env bash
# GPU check (issue 21, part 4): the GPU paths of the pipeline, end to end, inside one short device run.
#
#   benchmarks/gpu_check.sh [--run-dir runs/gpu_check] [--out benchmarks/results/gpu_check.json]
#                           [--mode auto|gpu|cpu] [--budget-s 420] [--dry-run]
#
# Steps, in order, each under `timeout` (and all of them under --budget-s):
#   0 preflight      the modules every step imports; on GPU torch.cuda and onnxruntime's CUDA provider
#   1 distill        amad distill --gpu: default teacher -> 4-head 2-layer student, ~312 steps of batch 64,
#                    1 Ray Train worker on NCCL, bf16 autocast (scaling.precision in the config written
#                    to <run dir>/distill.yaml; pipeline/distill_worker.py applies it on GPU only)
#   2 export         amad export of that student: ONNX, parity gate and latency on the CUDA execution
#                    provider (machine_providers picks it where a GPU exists), registered in the run's store
#   3 serve          amad serve --replica-gpus 1 in its own session; /healthz, amad loadtest, /v1/model must
#                    report CUDAExecutionProvider first; stopped with SIGTERM
#   4 loss_overhead  benchmarks/loss_overhead.py --device cuda
#   5 serve_latency  benchmarks/serve_latency.py, one replica on 4 of a 12-CPU cluster (the GPU machine has 16)
# On a machine without a GPU (no nvidia-smi, or torch sees no CUDA) the same script proves its plumbing:
# distill on CPU (gloo, fp32, 6 steps), export and serve on the CPU provider, loss_overhead --quick;
# serve_latency is SKIPPED (it is about the 16-core machine; its 2-core figures are in the README).
# --dry-run prints every step's command and which would be skipped here, runs only the preflight
# and exits 0. Results: <out> (default benchmarks/results/gpu_check.json; a dry run writes
# <run dir>/gpu_check.json) and a table on stdout. Exit status 1 if a step that ran failed.
#
# Everything goes under the run directory: logs, Ray storage, the MLflow store, exports, caches and
# temporary files. Ray's own private directory must have a short path (Unix socket names): it is put in
# <run dir>/r when that path is short enough, else pipeline/local_cluster makes it in /tmp and removes it.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ORIGINAL_COMMAND="benchmarks/gpu_check.sh $*"
RUN_DIR=runs/gpu_check OUT= MODE=auto BUDGET=420 DRY_RUN=0
while (($#)); do
    case $1 in
        --run-dir) RUN_DIR=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --mode) MODE=$2; shift 2 ;;
        --budget-s) BUDGET=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$RUN_DIR" && RUN_DIR=$(cd "$RUN_DIR" && pwd)
if [[ -z $OUT ]]; then
    ((DRY_RUN)) && OUT=$RUN_DIR/gpu_check.json || OUT=$ROOT/benchmarks/results/gpu_check.json
fi
STARTED=$(date +%s)

# The interpreter: $AMAD_PYTHON, else the project's venv, else python3 (the GPU image's has torch).
PY=${AMAD_PYTHON:-$( [[ -x .venv/bin/python ]] && echo "$ROOT/.venv/bin/python" || command -v python3 )}
HELPER=("$PY" benchmarks/gpu_check.py)
AMAD=("$PY" -m pipeline.cli)

# Nothing of the user's or the machine's: own cluster, own MLflow store, caches in the run directory.
unset RAY_ADDRESS RAY_TMPDIR MLFLOW_TRACKING_URI MLFLOW_REGISTRY_URI AMAD_SERVE_TOKEN AMAD_SERVE_CACHE
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # Ray's workers import pipeline/ where it is not pip-installed
export TMPDIR=$RUN_DIR/tmp XDG_CACHE_HOME=$RUN_DIR/cache MPLCONFIGDIR=$RUN_DIR/cache/matplotlib
export TORCHINDUCTOR_CACHE_DIR=$RUN_DIR/cache/torchinductor TRITON_CACHE_DIR=$RUN_DIR/cache/triton
(( ${#RUN_DIR} <= 20 )) && export RAY_TMPDIR=$RUN_DIR/r  # see pipeline/local_cluster.private_dir_parent

IFS=$'\t' read -r MODE MODE_REASON < <("${HELPER[@]}" detect --mode "$MODE")
[[ $MODE == gpu || $MODE == cpu ]] || { echo "gpu_check.sh: could not tell the mode (is $PY a Python with torch?)" >&2; exit 2; }
"${HELPER[@]}" prepare --run-dir "$RUN_DIR" --mode "$MODE" $( ((DRY_RUN)) && echo --dry-run ) || exit 2
[[ -n ${RAY_TMPDIR:-} ]] && mkdir -p "$RAY_TMPDIR"
echo "gpu_check: $MODE mode ($MODE_REASON); run directory $RUN_DIR; budget ${BUDGET} s"

record() {  # record NAME STATUS REASON RC SECONDS LIMIT LOG -- CMD...
    local name=$1 status=$2 reason=$3 rc=$4 seconds=$5 limit=$6 log=$7; shift 8
    "${HELPER[@]}" record --run-dir "$RUN_DIR" --mode "$MODE" --name "$name" --status "$status" \
        ${reason:+--reason "$reason"} ${rc:+--rc "$rc"} ${seconds:+--seconds "$seconds"} \
        ${limit:+--limit "$limit"} ${log:+--log "$log"} -- "$@"
}

skip() {  # skip NAME REASON -- CMD...: the step does not run here
    local name=$1 reason=$2; shift 3
    echo "==> $name: SKIPPED: $reason"
    record "$name" skipped "$reason" "" "" "" "" -- "$@"
}

step() {  # step NAME LIMIT_S -- CMD...: run CMD in its own session under timeout, record the outcome
    local name=$1 limit=$2; shift 3
    local why left=$((BUDGET - ($(date +%s) - STARTED) - 15)) log=$RUN_DIR/logs/$name.log
    if why=$("${HELPER[@]}" cannot-run --run-dir "$RUN_DIR" --step "$name" $( ((DRY_RUN)) && echo --dry-run )); then
        skip "$name" "$why" -- "$@"; return
    fi
    if ((left < 30)); then
        skip "$name" "budget spent (${left} s left of ${BUDGET} s)" -- "$@"; return
    fi
    ((limit > left)) && limit=$left
    echo "==> $name (limit ${limit} s): $*"
    if ((DRY_RUN)) && [[ $name != preflight ]]; then  # the preflight runs: it says what would be skipped
        record "$name" planned "would run (dry run)" "" "" "$limit" "" -- "$@"; return
    fi
    local begin=$(date +%s%N) rc sid
    # A new session per step: SIGINT at the limit (our commands then shut their Ray clusters down),
    # SIGKILL 20 s later; whatever the step leaves running afterwards is ended by its session id.
    setsid --wait bash -c 'echo $$ >"$0"; exec timeout --signal=INT --kill-after=20 "$@"' \
        "$RUN_DIR/tmp/$name.sid" "$limit" "$@" >"$log" 2>&1 </dev/null
    rc=$?
    sid=$(cat "$RUN_DIR/tmp/$name.sid" 2>/dev/null) && "${HELPER[@]}" end-session --sid "$sid"
    local ms=$((($(date +%s%N) - begin) / 1000000))
    local seconds=$((ms / 1000)).$(printf %03d $((ms % 1000)))
    local status=ok reason=
    ((rc != 0)) && status=failed
    ((rc == 124 || rc == 137)) && reason="timed out after ${limit} s"
    record "$name" "$status" "$reason" "$rc" "$seconds" "$limit" "$log" -- "$@"
    tail -n 3 "$log" | sed "s/^/    $name | /"
}

if [[ $MODE == gpu ]]; then
    GPU_FLAG=(--gpu) EXPORT_CONFIG=tune_configs/export.yaml PROVIDER=CUDAExecutionProvider
    REPLICA=(--replica-cpus 2 --replica-gpus 1)
    LOSS_ARGS=(--device cuda --allocator training)
else
    GPU_FLAG=() EXPORT_CONFIG=tune_configs/tiny/export.yaml PROVIDER=CPUExecutionProvider
    REPLICA=(--replica-cpus 1)
    LOSS_ARGS=(--device cpu --allocator training --quick --threads 1)
fi

# 0. preflight: a missing module skips the steps that import it (their reason names it).
step preflight 60 -- "${HELPER[@]}" preflight --run-dir "$RUN_DIR" --mode "$MODE"

# 1. distill (GPU: NCCL, bf16 autocast; CPU: gloo, fp32).
step distill 180 -- "${AMAD[@]}" distill --config "$RUN_DIR/distill.yaml" --workdir "$RUN_DIR" \
    --workers 1 --name gpu-check "${GPU_FLAG[@]}"

# 2. export: the parity gate runs on the providers the machine has (CUDA first on GPU).
CHECKPOINT=$("${HELPER[@]}" best-checkpoint --run-dir "$RUN_DIR" || echo "$RUN_DIR/ray/gpu-check/<best epoch_NNNN>")
step export 150 -- "${AMAD[@]}" export --config "$EXPORT_CONFIG" --checkpoint "$CHECKPOINT" --workdir "$RUN_DIR" \
    --name gpu-check --register gpu-check-student --force-export

# 3. serve: one answer (amad loadtest, real test-split questions) from a replica holding the GPU.
PORT=$("${HELPER[@]}" free-port)
step serve 150 -- "${HELPER[@]}" serve-answer --run-dir "$RUN_DIR" --expect "$PROVIDER" --start-s 90 -- \
    "${AMAD[@]}" serve --model models:/gpu-check-student@champion --workdir "$RUN_DIR" --port "$PORT" \
    "${REPLICA[@]}" --cache-dir "$RUN_DIR/serve-cache"

# 4. loss_overhead: a distillation step per attention method, on the GPU.
step loss_overhead 120 -- "$PY" benchmarks/loss_overhead.py "${LOSS_ARGS[@]}" --out "$RUN_DIR/loss_overhead.json"

# 5. serve_latency: CPU replicas on cores of their own; short windows to fit the device run.
LATENCY=("$PY" benchmarks/serve_latency.py --cluster-cpus 12 --replica-cpus 4 --seconds 2 --rounds 1
         --c1-requests 100 --out "$RUN_DIR/serve_latency.json")
if [[ $MODE == gpu ]]; then
    step serve_latency 180 -- "${LATENCY[@]}"
else
    skip serve_latency "measures replicas on cores of their own on the 16-core GPU machine; this machine has $(nproc) (its 2-core figures: README, benchmarks/serve_latency.py)" -- "${LATENCY[@]}"
fi

"${HELPER[@]}" report --run-dir "$RUN_DIR" --out "$OUT" --mode "$MODE" --mode-reason "$MODE_REASON" \
    --command "$ORIGINAL_COMMAND" --started "$STARTED" --budget "$BUDGET" $( ((DRY_RUN)) && echo --dry-run )
