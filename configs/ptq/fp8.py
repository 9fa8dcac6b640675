"""FP8 E4M3 W8A8: E4M3 weights per output channel, E4M3 activations per token (dynamic).

    python -m experiments.run --config=configs/ptq/fp8.py --workdir=/tmp/ptq-fp8 \
      [--config.quantize.act_scales=static]    # calibrated per-tensor activation scales
      [--config.quantize.method=gptq]          # GPTQ-rounded weights (calibrated)

On SmolLM2-135M (``benchmarks/RESULTS.md``): round-to-nearest weights +3.0% perplexity,
GPTQ-rounded weights (dynamic activations) +1.6%.
"""

from configs.ptq import common


def get_config(variant: str = ""):
    c = common.ptq_config(
        method="rtn",
        format="fp8_e4m3",
        group_size=0,
        granularity="channel",
        symmetric=True,
        activations="fp8_e4m3",
        act_scales="dynamic",
    )
    return common.finish(c, variant)
