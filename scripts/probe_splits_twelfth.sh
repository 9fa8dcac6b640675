#!/usr/bin/env bash
# Twelfth session: K splits and stages at M = 2-16 around the defaults, each beside its default
# in one process (8192², x read in place as the benchmark calls it).
#   . scripts/gpu_setup.sh; bash scripts/probe_splits_twelfth.sh "$OUT"
set -u
out=${1:-/tmp/probe_splits}
mkdir -p "$out"
s="int4_g128:2 int4_g128:2:num_stages=3 int4_g128:4 int4_g128:4:num_stages=3"
s="$s int4_g128:16 int4_g128:16:split_k=4 int4_g128:16:split_k=16"
s="$s mxfp4:16 mxfp4:16:split_k=4 nvfp4:16 nvfp4:16:split_k=4 nvfp4:4 nvfp4:4:split_k=8"
s="$s 2:4_int4:16 2:4_int4:16:split_k=2 2:4_int4:16:split_k=8"
s="$s 2:4_bf16:1 2:4_bf16:1:split_k=4 2:4_bf16:16 2:4_bf16:16:split_k=4"
s="$s int4_g128:1 int4_g128:4"
# shellcheck disable=SC2086
python3 scripts/probe_call_kernels.py $s --keep-going --json "$out/splits.json" > "$out/splits.log" 2>&1
grep -h "span\|FAILED" "$out/splits.log"
