#!/usr/bin/env bash
# Twelfth session's probes around the decode kernels' defaults (8192², x read in place as the
# benchmark calls them), each spec beside its default on one card:
#   mma_v2: 4 (or 8) warps on mma.sync instead of wgmma. Triton picks wgmma for every dot a
#     warpgroup can run; its DISABLE_MMA_V3 switch (read by the Triton inside XLA at compile
#     time) leaves mma.sync. Two processes: the defaults as they are, then the same with
#     DISABLE_MMA_V3=1 plus 4/8-warp variants.
#   splits: K splits and stages at M = 1-16 around the defaults.
#   . scripts/gpu_setup.sh; bash scripts/probe_twelfth.sh mma_v2|splits "$OUT"
set -u
what=${1:?mma_v2 or splits}
out=${2:-/tmp/probe_twelfth}
mkdir -p "$out"
probe() { # json name, then probe_call_kernels.py arguments
  local name=$1
  shift
  python3 scripts/probe_call_kernels.py "$@" --keep-going --json "$out/$name.json" \
    > "$out/$name.log" 2>&1
  grep -h "span\|FAILED" "$out/$name.log"
}
case $what in
  mma_v2)
    base="int4_g128:1 int4_g128:4 int4_g128:16 mxfp4:1 mxfp4:4 mxfp4:16 nvfp4:1 nvfp4:4"
    base="$base nvfp4:16 2:4_bf16:1 2:4_bf16:16 2:4_int4:1 2:4_int4:16"
    var="int4_g128:1:num_warps=4,rows=64,split_k=8 int4_g128:1:num_warps=4,rows=64,split_k=4"
    var="$var int4_g128:1:num_warps=4,rows=128,split_k=8 int4_g128:4:num_warps=4,rows=64,split_k=8"
    var="$var int4_g128:4:num_warps=4,rows=128,split_k=8 int4_g128:16:num_warps=4"
    var="$var int4_g128:16:num_warps=8 mxfp4:4:num_warps=4 mxfp4:16:num_warps=4"
    var="$var nvfp4:4:num_warps=4 nvfp4:16:num_warps=4 2:4_int4:1:num_warps=4"
    var="$var 2:4_int4:16:num_warps=4 2:4_bf16:16:num_warps=4"
    # shellcheck disable=SC2086
    probe wgmma $base
    # shellcheck disable=SC2086
    (export DISABLE_MMA_V3=1 && probe mma_v2 $base $var --set driver.WGMMA_MIN_N=8)
    ;;
  splits)
    s="int4_g128:2 int4_g128:2:num_stages=3 int4_g128:4 int4_g128:4:num_stages=3"
    s="$s int4_g128:16 int4_g128:16:split_k=4 int4_g128:16:split_k=16"
    s="$s mxfp4:16 mxfp4:16:split_k=4 nvfp4:16 nvfp4:16:split_k=4 nvfp4:4 nvfp4:4:split_k=8"
    s="$s 2:4_int4:16 2:4_int4:16:split_k=2 2:4_int4:16:split_k=8"
    s="$s 2:4_bf16:1 2:4_bf16:1:split_k=4 2:4_bf16:16 2:4_bf16:16:split_k=4"
    s="$s int4_g128:1 int4_g128:4"
    # shellcheck disable=SC2086
    probe splits $s
    ;;
  *)
    echo "usage: $0 mma_v2|splits [out dir]" >&2
    exit 2
    ;;
esac
