"""GPTQ W4 g128 (asymmetric int4) with 128 × 2048 WikiText-2 calibration tokens, act-order and
the reference quantizer's clipping grid search (on SmolLM2-135M: ppl 27.1 vs 31.4 with the
reference defaults and 30.0 for RTN; ``benchmarks/RESULTS.md``).

    python -m experiments.run --config=configs/ptq/gptq.py --workdir=/tmp/ptq-gptq \
      [--config.quantize.format=int3] \
      [--config.quantize.gptq.act_order=False --config.quantize.gptq.mse_grid=0]  # reference

``get_sweep()`` lists the overrides of the W4/W3 × g128/g64 × act-order grid (plus GPTQ onto
NF4 / MXFP4 grids), one dict of dotted config keys per run.
"""

from configs.ptq import common


def get_config(variant: str = ""):
    c = common.ptq_config(method="gptq", format="int4", group_size=128, symmetric=False)
    c.quantize.gptq.act_order = True
    c.quantize.gptq.mse_grid = 100
    return common.finish(c, variant)


def get_sweep():
    runs = []
    for fmt in ("int4", "int3"):
        for gs in (128, 64):
            for act_order in (False, True):
                for mse_grid in (0, 100):
                    runs.append(
                        {
                            "quantize.format": fmt,
                            "quantize.group_size": gs,
                            "quantize.gptq.act_order": act_order,
                            "quantize.gptq.mse_grid": mse_grid,
                        }
                    )
    runs.append({"quantize.format": "nf4", "quantize.group_size": 64, "quantize.symmetric": True})
    runs.append({"quantize.format": "mxfp4", "quantize.group_size": 32, "quantize.symmetric": True})
    return runs
