. scripts/gpu_setup.sh
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 python3 -m pytest -m gpu -q -n 4 -p no:cacheprovider tests/kernels/test_sparse24_tc.py > $OUT/gpu_tests_24.log 2>&1; tail -2 $OUT/gpu_tests_24.log
S=""; for m in 1 4 16; do S="$S 2:4_int4:$m 2:4_int4:$m:sparse24_tc.XSUM_WITH_KERNEL_X=xla"; done
for kn in "8192 8192" "4096 14336"; do set -- $kn
python3 scripts/probe_call_kernels.py $S 2:4_int4:1 --k $1 --n $2 --json $OUT/p24_$1x$2.json 2>&1 | grep -v Warning > $OUT/p24_$1x$2.log; grep span $OUT/p24_$1x$2.log
done
run() { # MID_TOKENS formats out
python3 -c "import sys, runpy; from shrinkjax.kernels import int4_tc as M; M.MID_TOKENS=$1; sys.argv=['decode.py']+sys.argv[1:]; runpy.run_path('benchmarks/decode.py', run_name='__main__')" --formats $2 --batches 32 --lm-head format --attention pallas_decode --norm deferred --out $OUT/dec32_$3.json > $OUT/dec32_$3.log 2>&1
grep "batch  32" $OUT/dec32_$3.log | tail -2
}
run 16 bf16,int4_g128 mid16_a
run 32 int4_g128 mid32
run 16 int4_g128 mid16_b
cd $OUT && tar czf call8.tgz *.log *.json && rm -f *.log *.json
