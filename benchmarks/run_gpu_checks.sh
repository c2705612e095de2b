#!/usr/bin/env bash
# Everything gvsl checks on a lent GPU, in one call (the device time is short):
#   bash benchmarks/run_gpu_checks.sh [pretrain|register|graphs|layers|layout|compile|next|next2|next3|padding|final|all]
# Installs the carried wheels (.whl: SimpleITK, platformdirs) when present, then runs the GPU
# tests and the benchmarks, each under its own time limit. Logs go to $OUT (or /tmp/gvsl-gpu).
set -u -o pipefail
export PYTHONUNBUFFERED=1
what=${1:-all}
out=${OUT:-/tmp/gvsl-gpu}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]}"
}

if [ "$what" = pretrain ] || [ "$what" = all ]; then
  step gpu-tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
  step ncc 40 python3 benchmarks/bench_ncc.py --device cuda --sizes 128 --repeats 10
  step pretrain-bench 200 python3 benchmarks/bench_pretrain.py --device cuda --quick --sizes 128 --batches 1 2 --groupnorm auto native --compile --compile-batches 1
  step pretrain-cli 45 python3 -m gvsl_cli pretrain gvsl_cli/examples -o /tmp/gvsl-run --iters 40 --patch 128 --log-every 10 --quiet --cache-dir /tmp/gvsl-cache
fi
if [ "$what" = graphs ]; then
  step graphs-bench 150 python3 benchmarks/bench_pretrain.py --device cuda --quick --sizes 128 --batches 1 \
    --compile --compile-batches 1 --compile-mode reduce-overhead
fi
if [ "$what" = layers ]; then
  step layers 330 python3 benchmarks/bench_layers.py --sections convs upsample warp profile
  step layers-limit0 70 python3 benchmarks/bench_layers.py --sections convs --benchmark-limit 0
fi
if [ "$what" = layout ]; then
  step gpu-tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
  step pretrain-bench 270 python3 benchmarks/bench_pretrain.py --device cuda --quick --sizes 128 --batches 1 2 --layout ncdhw ndhwc --compile --compile-batches 1
  step pretrain-cli 45 python3 -m gvsl_cli pretrain gvsl_cli/examples -o /tmp/gvsl-run --iters 30 --patch 128 --log-every 10 --quiet --cache-dir /tmp/gvsl-cache
  step layers 60 python3 benchmarks/bench_layers.py --sections upsample profile
fi
if [ "$what" = compile ]; then
  step pretrain-compile 260 python3 benchmarks/bench_pretrain.py --device cuda --quick --sizes 128 --batches 1 --layout ncdhw ndhwc --compile --compile-batches 1 --no-eager
fi
if [ "$what" = next ]; then
  # First of two calls (~560 s): correctness on the GPU, the current code's rows for
  # docs/performance.md (96³ and 128³, batch 1 and 2; the compiled 128³ row now without
  # host syncs), the prepared variants (first convolution by im2col matrix product,
  # augmentation compiled: both separable in one run, the first changes the model step,
  # the second the loading + augmentation column), model + losses compiled as one graph,
  # and a profile of the compiled step.
  step gpu-tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
  step pretrain-rows 150 python3 benchmarks/bench_pretrain.py --device cuda --quick --sizes 96 128 --batches 1 2 --compile --compile-batches 1
  step pretrain-variants 90 python3 benchmarks/bench_pretrain.py --device cuda --quick --sizes 128 --batches 1 --compile --compile-batches 1 --no-eager --first-conv matmul --compile-augmentation
  step pretrain-compile-step 100 python3 benchmarks/bench_pretrain.py --device cuda --quick --sizes 128 --batches 1 --compile --compile-batches 1 --no-eager --compile-scope step
  step profile-compiled 80 python3 benchmarks/bench_layers.py --sections profile --profile-compiled
  step pretrain-cli-compiled 80 python3 -m gvsl_cli pretrain gvsl_cli/examples -o /tmp/gvsl-run-c --iters 40 --patch 128 --log-every 10 --compile --cache-dir /tmp/gvsl-cache
fi
if [ "$what" = padding ]; then
  # Convolutions with channel counts padded to multiples of 8 (model.AlignedConv3d) against
  # unpadded ones, on the same machine in one process (~200 s).
  step gpu-tests 40 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
  step pretrain-padding 190 python3 benchmarks/bench_pretrain.py --device cuda --quick --sizes 128 --batches 1 --compile --compile-batches 1 --channel-padding off auto
fi
if [ "$what" = next3 ]; then
  # For the model-step and full-iteration targets (~520 s): a profile of the compiled step with every kernel
  # named in full, inductor's generated code (which operations each fused kernel holds)
  # and a Chrome trace, all under $OUT; then GroupNorm statistics from per-channel sums
  # against per-group ones, compiled, in one process.
  step gpu-tests 40 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
  step profile-kernels 150 env TORCH_LOGS=output_code python3 benchmarks/bench_layers.py --sections profile --profile-compiled --profile-rows 60 --profile-trace "$out/compiled-step-trace.json"
  gzip -f "$out/compiled-step-trace.json" 2>/dev/null
  step pretrain-groupnorm 200 python3 benchmarks/bench_pretrain.py --device cuda --quick --sizes 128 --batches 1 --compile --compile-batches 1 --no-eager --groupnorm auto channels
  # The full iteration with the next batch made on a side stream during the step.
  step pretrain-overlap 100 python3 benchmarks/bench_pretrain.py --device cuda --quick --sizes 128 --batches 1 --compile --compile-batches 1 --no-eager --overlap-augmentation
fi
if [ "$what" = next2 ]; then
  # Second call, on the same warm machine: inductor's autotuned kernels (Triton templates
  # against cuBLAS/cuDNN; a long compile).
  step pretrain-autotune 200 python3 benchmarks/bench_pretrain.py --device cuda --quick --sizes 128 --batches 1 --compile --compile-batches 1 --no-eager --compile-mode max-autotune-no-cudagraphs
  # Lower priority than the pre-training rows above (issue 3): gvsl embed, finetune and
  # segment at the paper's width on the full-resolution volumes (.gpudata/, carried).
  data=${GVSL_BENCH_DATA:-.gpudata}
  step embed-bench 90 python3 benchmarks/bench_embed.py \
    "$data/mr_colin27_t1.nii.gz" "$data/mr_icbm152_t1.nii.gz" "$data/ct_head_scaled.nii.gz" --device cuda --repeats 3 --overlaps
  step embed-bench-dense 90 python3 benchmarks/bench_embed.py \
    "$data/mr_colin27_t1.nii.gz" "$data/ct_head_scaled.nii.gz" --device cuda --repeats 3 --overlaps 0.5
  step finetune-bench 200 python3 benchmarks/bench_finetune.py --device cuda --repeats 5 --compile --image "$data/mr_colin27_t1.nii.gz"
fi
if [ "$what" = final ]; then
  data=${GVSL_BENCH_DATA:-.gpudata}
  step gpu-tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
  step register-bench-auto 90 python3 benchmarks/bench_register.py --device cuda --repeats 3 --spacings auto \
    --moving "$data/mr_colin27_t1.nii.gz" --fixed "$data/mr_icbm152_t1.nii.gz" \
    --moving-labels "$data/mr_colin27_tissue.nii.gz" --fixed-labels "$data/mr_icbm152_tissue.nii.gz"
  for i in 1 2; do
    step register-cli-$i 60 bash -c "time python3 -m gvsl_cli register $data/mr_icbm152_t1.nii.gz $data/mr_colin27_t1.nii.gz -o /tmp/reg$i --moving-labels $data/mr_colin27_tissue.nii.gz --fixed-labels $data/mr_icbm152_tissue.nii.gz"
  done
fi
if [ "$what" = register ] || [ "$what" = all ]; then
  if [ -f benchmarks/bench_register.py ]; then
    # The full-resolution pair of ../shared/data, copied into .gpudata/ (carried, not committed).
    data=${GVSL_BENCH_DATA:-.gpudata}
    step register-bench 150 python3 benchmarks/bench_register.py --device cuda --repeats 3 --spacings auto 1.25 1.0 \
      --moving "$data/mr_colin27_t1.nii.gz" --fixed "$data/mr_icbm152_t1.nii.gz" \
      --moving-labels "$data/mr_colin27_tissue.nii.gz" --fixed-labels "$data/mr_icbm152_tissue.nii.gz"
  fi
fi
