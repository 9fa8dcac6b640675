"""Training metrics: FLOP/MFU estimates, JSONL + TensorBoard event files, a one-step-late
fetcher (the host never waits for the step it just dispatched), and a jitted evaluator of
perplexity and KL to the teacher.

The TensorBoard writer is self-contained (TFRecord framing with masked CRC32C, and the few
``Event``/``Summary`` protobuf fields a scalar needs, encoded by hand), so no TensorFlow or
tensorboard package is needed to *write*; ``tensorboard --logdir <workdir>/tb`` reads it.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np

from shrinkjax.io.files import append_jsonl

# ----------------------------------------------------------------------------- FLOPs / MFU

# Dense bf16 peak FLOP/s by device kind (substring match, first wins).
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("H800", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
)


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul per token (blocks + LM head, no embedding
    lookup)."""
    h, d = cfg.head_width, cfg.dim
    attn = d * cfg.n_heads * h * 2 + d * cfg.n_kv_heads * h * 2
    return cfg.n_layers * (attn + 3 * d * cfg.hidden_dim) + d * cfg.vocab_size


def forward_flops_per_token(cfg, seqlen: int) -> float:
    """2·N_matmul + attention scores and mixing (4·layers·L·N·H, PaLM convention: the full
    L×L, not the causal half)."""
    return 2.0 * matmul_params(cfg) + 4.0 * cfg.n_layers * seqlen * cfg.n_heads * cfg.head_width


def train_flops_per_token(student_cfg, seqlen: int, teacher_cfg=None) -> float:
    """Student forward + backward (3× forward) plus the teacher's forward, per token."""
    f = 3.0 * forward_flops_per_token(student_cfg, seqlen)
    if teacher_cfg is not None:
        f += forward_flops_per_token(teacher_cfg, seqlen)
    return f


def peak_flops(device=None) -> float | None:
    """Dense bf16 peak of a device (None when unknown, e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for key, val in PEAK_BF16:
        if key in kind:
            return val
    return None


def mfu(
    tokens_per_s: float, flops_per_token: float, n_devices: int = 1, peak: float | None = None
) -> float | None:
    peak = peak if peak else peak_flops()
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * n_devices)


# ----------------------------------------------------------------------------- TensorBoard


def _crc32c_table():
    poly = 0x82F63B78
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(num: int, payload: bytes) -> bytes:
    return _varint((num << 3) | 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float, step: int = 0, scalars: dict | None = None, file_version: str | None = None
) -> bytes:
    """A serialized ``tensorflow.Event`` (wall_time=1, step=2, file_version=3, summary=5)."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(int(step))
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        summary = b""
        for tag, val in scalars.items():
            value = _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", float(val))
            summary += _field_bytes(1, value)
        out += _field_bytes(5, summary)
    return out


def frame_record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


def read_records(path: str) -> list[bytes]:
    """The records of a TFRecord file, CRCs checked (for tests and tools)."""
    out = []
    with open(path, "rb") as f:
        buf = f.read()
    i = 0
    while i < len(buf):
        (n,) = struct.unpack("<Q", buf[i : i + 8])
        (hc,) = struct.unpack("<I", buf[i + 8 : i + 12])
        if hc != _masked_crc(buf[i : i + 8]):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        data = buf[i + 12 : i + 12 + n]
        (dc,) = struct.unpack("<I", buf[i + 12 + n : i + 16 + n])
        if dc != _masked_crc(data):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        out.append(data)
        i += 16 + n
    return out


class TensorBoardWriter:
    """Appends scalar summaries to ``<logdir>/events.out.tfevents.<time>.<host>``."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._f.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: dict) -> None:
        vals = {
            k: v
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        if vals:
            self._f.write(frame_record(encode_event(time.time(), step, vals)))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()


# ----------------------------------------------------------------------------- logging


def to_host(metrics: dict) -> dict:
    """Device metrics -> python floats (blocks until they are ready)."""
    out = {}
    for k, v in jax.device_get(metrics).items():
        a = np.asarray(v)
        out[k] = bool(a) if a.dtype == bool else float(a)
    return out


class MetricsLogger:
    """JSONL (``<workdir>/metrics.jsonl``) + TensorBoard (``<workdir>/tb``) for one run."""

    def __init__(self, workdir: str, tensorboard: bool = True, prefix: str = "train"):
        self.jsonl = os.path.join(workdir, "metrics.jsonl")
        self.tb = TensorBoardWriter(os.path.join(workdir, "tb")) if tensorboard else None
        self.prefix = prefix

    def log(self, step: int, values: dict, kind: str | None = None) -> None:
        kind = kind or self.prefix
        append_jsonl(self.jsonl, {"kind": kind, "step": int(step), **values})
        if self.tb is not None:
            self.tb.scalars(step, {f"{kind}/{k}": v for k, v in values.items()})
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class LateFetcher:
    """Keeps the last step's device metrics and hands them over one step later, so fetching
    them overlaps the next step instead of stalling the device."""

    def __init__(self):
        self._pending: tuple[int, dict] | None = None

    def push(self, step: int, metrics: dict) -> tuple[int, dict] | None:
        prev, self._pending = self._pending, (step, metrics)
        return None if prev is None else (prev[0], to_host(prev[1]))

    def flush(self) -> tuple[int, dict] | None:
        prev, self._pending = self._pending, None
        return None if prev is None else (prev[0], to_host(prev[1]))


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    """Perplexity of a student (and of the teacher) and KL(p_T ‖ p_S) on fixed windows.

    Uses the trainer's functional forward (scanned layers) and chunked logits, one compiled
    program per (forward, batch shape).
    """

    def __init__(self, student_fwd, teacher_fwd=None, chunk: int = 4096):
        from shrinkjax.distill import losses

        self.sfwd, self.tfwd = student_fwd, teacher_fwd
        ce_cfg = losses.LossConfig(alpha=1.0, divergence="none", chunk=chunk)

        def sums(s_flat, t_flat, tokens, valid):
            labels, mask = losses.next_token_targets(tokens, valid)
            hs, _ = self.sfwd.hidden(s_flat, tokens)
            s_head = self.sfwd.head(s_flat)
            hs = hs.reshape(-1, hs.shape[-1])
            y = labels.reshape(-1)
            if t_flat is None:
                return losses.loss_sums(lambda h, yy: (s_head(h), None, yy), (hs, y), mask, ce_cfg)
            ht, _ = self.tfwd.hidden(t_flat, tokens)
            t_head = self.tfwd.head(t_flat)
            ht = ht.reshape(-1, ht.shape[-1])
            # CE of the student, KL(p_T||p_S) at τ=1, and the teacher's own CE
            out = losses.loss_sums(
                lambda h, g, yy: (s_head(h), t_head(g), yy), (hs, ht, y), mask, ce_cfg, with_kl=True
            )
            tce = losses.loss_sums(lambda g, yy: (t_head(g), None, yy), (ht, y), mask, ce_cfg)
            out["teacher_ce"] = tce["ce"]
            return out

        self._sums = jax.jit(sums)

    def __call__(
        self,
        student_flat,
        tokens_WxL: np.ndarray,
        batch_size: int,
        teacher_flat=None,
        progress: bool = False,
        desc: str = "eval",
        shardings=None,
    ) -> dict:
        """{'ppl', 'nll', 'tokens'} (+ 'kl', 'teacher_ppl' with a teacher)."""
        from tqdm.auto import tqdm

        from shrinkjax.data.windows import batches

        tot: dict = {}
        scored = np.ones_like(tokens_WxL, bool)
        n = -(-len(tokens_WxL) // batch_size)
        for t, v, _ in tqdm(
            batches(tokens_WxL, scored, batch_size),
            total=n,
            desc=desc,
            disable=not progress,
            leave=False,
        ):
            t, v = jnp.asarray(t), jnp.asarray(v)
            if shardings is not None:
                t, v = jax.device_put(t, shardings), jax.device_put(v, shardings)
            s = self._sums(student_flat, teacher_flat, t, v)
            for k, x in s.items():
                tot[k] = tot.get(k, 0.0) + float(x)
        c = max(tot.get("count", 0.0), 1.0)
        nll = tot["ce"] / c
        out = {"ppl": math.exp(min(nll, 700.0)), "nll": nll, "tokens": int(tot["count"])}
        if "kl" in tot:
            out["kl"] = tot["kl"] / c
            out["teacher_nll"] = tot["teacher_ce"] / c
            out["teacher_ppl"] = math.exp(min(out["teacher_nll"], 700.0))
        return out
