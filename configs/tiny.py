"""Test-sized variant of the default: the tiny random HF Llama in tests/golden, 2 windows.

python -m experiments.run --config=configs/tiny.py --workdir=/tmp/tiny
"""

import os

from configs import default

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = default.base()
    c.model.teacher = os.path.join(HERE, "..", "tests", "golden", "tiny_llama")
    c.data.seqlen = 32
    c.data.max_windows = 2
    c.data.batch_size = 2
    c.evaluate.prompts = ("hello",)
    c.evaluate.max_new_tokens = 4
    c.lock()
    return c
