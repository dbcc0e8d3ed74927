#!/usr/bin/env bash
# The device script of issue 9, one stage per device call (see bench/results/gpu/README.md for how it was run):
#   bash bench/gpu/run_h100.sh probe|vitb|vith|ort|vith_fp16|vith_export
# It expects a GrabCut subset under .gpu_data/GrabCut (carried: ../shared does not travel) and, for `ort` and
# `vith_fp16`, the onnxruntime-gpu 1.31.1 wheel's contents as xz tar parts copied to /tmp/ortparts by earlier calls.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
stage=$1
data=.gpu_data/GrabCut
ort_site() {
  mkdir -p /tmp/ortsite && cat /tmp/ortparts/part_* | xz -d | tar x -C /tmp/ortsite && export PYTHONPATH=/tmp/ortsite
  python3 -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
}
lat() { python3 bench/latency.py --device cuda --dataset $data --mode StdInfer,CFR-1,A-CFR-4 --out "$OUT/$1" "${@:2}"; }
case $stage in
  probe)
    nvidia-smi -L; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
    python3 bench/gpu/h100_check.py --out "$OUT/probe" 2>&1 | tee "$OUT/probe.log" ;;
  vitb)
    lat vitb --arch vit_base --limit 6 --clicks 20 \
      --engines torch-cuda-fp32,torch-cuda-fp16,compiled-fp16,compiled-bf16 2>&1 | tee "$OUT/vitb.log" ;;
  vith)
    lat vith --arch vit_huge --limit 4 --clicks 20 --engines torch-cuda-fp16,compiled-fp16 2>&1 | tee "$OUT/vith.log" ;;
  ort)
    ort_site
    lat ort --arch vit_base --limit 6 --clicks 20 --engines ort-cuda-fp32,ort-cuda-fp16,compiled-fp16 \
      2>&1 | tee "$OUT/ort.log" ;;
  vith_fp16)
    # issue 22, not yet run: ViT-H through ONNX on the GPU. The fp16 graph (1.3 GB, one file) on ONNX Runtime's
    # CUDA provider and, where TensorRT is installed, as a TensorRT plan; the torch fp16 engine beside them.
    ort_site
    trt=""; python3 -c "import tensorrt" 2>/dev/null && trt=",trt"
    lat vith_fp16 --arch vit_huge --limit 4 --clicks 20 --mode StdInfer,A-CFR-4 \
      --engines "ort-cuda-fp16,torch-cuda-fp16$trt" 2>&1 | tee "$OUT/vith_fp16.log" ;;
  vith_export)
    # issue 22, not yet run: cfr-export of a random ViT-H with --fp16 --int8 (fp32 past 2 GB: model.onnx +
    # model.onnx.data; every graph verified on the CPU): wall time and peak RSS (getrusage) on this machine
    mkdir -p "$OUT/vith_export"
    python3 bench/vith_smoke.py --dataset $data --out "$OUT/vith_export" --click-models model.onnx,model_int8.onnx \
      2>&1 | tee "$OUT/vith_export.log" ;;
esac
# the device tool brings back at most 8 files: pack each stage into one archive
tar czf "$OUT/$stage.tgz" -C "$OUT" $(cd "$OUT" && ls -d "$stage" "$stage.log" 2>/dev/null) && rm -rf "$OUT/$stage" "$OUT/$stage.log"
ls -la "$OUT"
