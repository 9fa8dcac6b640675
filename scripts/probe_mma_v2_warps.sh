#!/usr/bin/env bash
# Twelfth session: the decode kernels with 4 (or 8) warps on mma.sync instead of wgmma.
# Triton picks wgmma for every dot a warpgroup can run; its DISABLE_MMA_V3 switch (read by the
# Triton inside XLA at compile time) leaves mma.sync. Two processes on one card, same specs:
# the defaults as they are, then the same with DISABLE_MMA_V3=1 plus 4/8-warp variants.
#   . scripts/gpu_setup.sh; bash scripts/probe_mma_v2_warps.sh "$OUT"
set -u
out=${1:-/tmp/probe_mma_v2}
mkdir -p "$out"
base="int4_g128:1 int4_g128:4 int4_g128:16 mxfp4:1 mxfp4:4 mxfp4:16 nvfp4:1 nvfp4:4 nvfp4:16"
base="$base 2:4_bf16:1 2:4_bf16:16 2:4_int4:1 2:4_int4:16"
var="int4_g128:1:num_warps=4,rows=64,split_k=8 int4_g128:1:num_warps=4,rows=64,split_k=4"
var="$var int4_g128:1:num_warps=4,rows=128,split_k=8 int4_g128:4:num_warps=4,rows=64,split_k=8"
var="$var int4_g128:4:num_warps=4,rows=128,split_k=8 int4_g128:16:num_warps=4"
var="$var int4_g128:16:num_warps=8 mxfp4:4:num_warps=4 mxfp4:16:num_warps=4"
var="$var nvfp4:4:num_warps=4 nvfp4:16:num_warps=4 2:4_int4:1:num_warps=4"
var="$var 2:4_int4:16:num_warps=4 2:4_bf16:16:num_warps=4"
# shellcheck disable=SC2086
python3 scripts/probe_call_kernels.py $base --keep-going --json "$out/wgmma.json" \
  > "$out/wgmma.log" 2>&1
# shellcheck disable=SC2086
DISABLE_MMA_V3=1 python3 scripts/probe_call_kernels.py $base $var --keep-going \
  --set driver.WGMMA_MIN_N=8 --json "$out/mma_v2.json" > "$out/mma_v2.log" 2>&1
grep -h "span\|FAILED" "$out/wgmma.log" "$out/mma_v2.log"
