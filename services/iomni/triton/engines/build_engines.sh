#!/usr/bin/env bash
# Build the TensorRT engines of the GPU profile from the project's ONNX exports.
#
# Runs INSIDE NVIDIA's Triton container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3), which ships
# trtexec in /usr/src/tensorrt/bin. A plan is tied to the GPU architecture and TensorRT version
# it was built with: build with the same container tag that will serve it, on the same GPU kind.
# It cannot run on a machine without an NVIDIA GPU and TensorRT (the development machines).
#
# Usage:
#   build_engines.sh [--fp16] [--dry-run] ONNX_DIR MODEL_REPO [-- EXTRA_TRTEXEC_ARGS...]
#
#   ONNX_DIR    holds vision_encoder.onnx and audio_encoder.onnx
#               (python -m iomni.model.export CHECKPOINT ONNX_DIR); a graph over 2 GiB has its
#               weights in <name>.onnx.data beside it, which trtexec reads from there.
#   MODEL_REPO  Triton model repository; writes MODEL_REPO/{vision,audio}_encoder/1/model.plan
#               (config.pbtxt files are not this script's business).
#   --fp16      let TensorRT pick FP16 kernels; the I/O tensors stay FP32 as in the ONNX graphs.
#   --dry-run   print the trtexec command lines instead of running them (works without trtexec).
#   after --    passed to every trtexec call, e.g. -- --memPoolSize=workspace:8192
#
# Optimisation profiles (min / opt / max); override with the environment variables named:
#   vision PIXEL_VALUES  batch VISION_MIN_BATCH=1 / VISION_OPT_BATCH=8 / VISION_MAX_BATCH=16,
#                        at 3x448x448 (one image is at most 12 tiles + thumbnail = 13)
#   audio  MEL           1x128xAUDIO_MIN_FRAMES(4) / 4x128x3000 / 8x128x3000; batch via
#                        AUDIO_{MIN,OPT,MAX}_BATCH, frames via AUDIO_{MIN,OPT,MAX}_FRAMES.
#                        Frames are 100 Hz mel frames; 3000 = one 30 s Whisper window.
#                        Inputs outside a profile are rejected by TensorRT, not clamped.
#
# Environment: TRTEXEC  path to trtexec (default: on PATH, else /usr/src/tensorrt/bin/trtexec).

set -euo pipefail

usage() {
    sed -n '9,11p' "$0" | sed 's/^# \{0,3\}//' >&2
    exit 2
}

fp16=0
dry_run=0
positional=()
extra=()
while (($#)); do
    case "$1" in
        --fp16) fp16=1 ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage ;;
        --) shift; extra=("$@"); break ;;
        -*) echo "build_engines.sh: unknown option $1" >&2; usage ;;
        *) positional+=("$1") ;;
    esac
    shift
done
((${#positional[@]} == 2)) || usage
onnx_dir=${positional[0]}
repo=${positional[1]}

find_trtexec() {
    if [[ -n ${TRTEXEC:-} ]]; then
        echo "$TRTEXEC"
    elif command -v trtexec >/dev/null 2>&1; then
        command -v trtexec
    else
        echo /usr/src/tensorrt/bin/trtexec
    fi
}

trtexec=$(find_trtexec)
if ((dry_run == 0)) && [[ ! -x $trtexec ]]; then
    cat >&2 <<MSG
build_engines.sh: trtexec not found (looked at \$TRTEXEC, PATH, /usr/src/tensorrt/bin/trtexec).
TensorRT engines are built inside NVIDIA's Triton container on a GPU machine, e.g.:
  docker run --rm --gpus all -v "\$PWD:/workspace" -w /workspace \\
    nvcr.io/nvidia/tritonserver:24.08-py3 \\
    bash services/iomni/triton/engines/build_engines.sh $onnx_dir $repo
See services/iomni/triton/engines/README.md.
MSG
    exit 127
fi

for name in vision_encoder audio_encoder; do
    if [[ ! -f $onnx_dir/$name.onnx ]]; then
        echo "build_engines.sh: $onnx_dir/$name.onnx is missing;" \
            "export it first: python -m iomni.model.export CHECKPOINT $onnx_dir" >&2
        exit 1
    fi
done

# build NAME INPUT MIN OPT MAX: one plan at MODEL_REPO/NAME/1/model.plan.
build() {
    local name=$1 input=$2 min=$3 opt=$4 max=$5
    local plan=$repo/$name/1/model.plan
    local cmd=(
        "$trtexec"
        "--onnx=$onnx_dir/$name.onnx"
        "--saveEngine=$plan"
        "--minShapes=$input:$min"
        "--optShapes=$input:$opt"
        "--maxShapes=$input:$max"
    )
    ((fp16)) && cmd+=(--fp16)
    cmd+=("${extra[@]}")
    if ((dry_run)); then
        printf '%q ' "${cmd[@]}"
        echo
        return
    fi
    mkdir -p "$(dirname "$plan")"
    echo "building $plan" >&2
    "${cmd[@]}"
}

build vision_encoder PIXEL_VALUES \
    "${VISION_MIN_BATCH:-1}x3x448x448" \
    "${VISION_OPT_BATCH:-8}x3x448x448" \
    "${VISION_MAX_BATCH:-16}x3x448x448"
build audio_encoder MEL \
    "${AUDIO_MIN_BATCH:-1}x128x${AUDIO_MIN_FRAMES:-4}" \
    "${AUDIO_OPT_BATCH:-4}x128x${AUDIO_OPT_FRAMES:-3000}" \
    "${AUDIO_MAX_BATCH:-8}x128x${AUDIO_MAX_FRAMES:-3000}"
