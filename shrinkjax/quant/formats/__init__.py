"""Registry of quantization formats and the :class:`Format` interface they implement.

Every format quantizes a kernel ``w_KxN`` (stored ``[in, out]``) group-wise *along K*: for each
output column n, ``G`` consecutive input rows share scale-side parameters ("qparams"), exactly
as GPTQ and AWQ group their weights. Per-channel is ``G = K``; per-tensor additionally shares
one scale across all columns.

qparams are a ``dict[str, Array]`` whose keys are :class:`~shrinkjax.quant.array.QuantizedArray`
field names (``scales``, ``zeros``, ``scales2``, ``zeros2``) in their storage dtypes, each 2-D
with one leading row per group: ``[g, N]`` (or ``[g, 1]`` per-tensor, ``[g, ceil(N/256)]`` for
NF4 double quant); int-k formats allow K not divisible by G (``ragged_groups``): ``ceil(K/G)``
groups, the last one shorter. Keys in ``Format.tensor_keys`` (the NVFP4 FP32 tensor scale) are
shared by all groups and always have one row.

GPTQ-style use (one input row at a time, params fitted when a row starts a group)::

    fmt = formats.make(QuantSpec("int4", group_size=128, symmetric=False))
    G = fmt.group_rows(K)
    amax = jnp.max(jnp.abs(W))                     # only NVFP4 needs it; harmless elsewhere
    for k in range(K):
        if k % G == 0:
            qp = fmt.fit(W[k:k + G], tensor_amax=amax)   # qparams, leading dim 1
            params.append(qp)
        q_1xN = fmt.fake_quant(W[k:k + 1], qp)      # jittable, R = 1 works
        ...                                          # error feedback into W[k + 1:]
    qarr = fmt.from_groups(W, params)               # list or stacked dict

and RTN is ``fmt.quantize(W)`` (= ``from_groups(W, fit(W))``). Invariant (tested):
``fake_quant(W[rows], qp) == from_groups(W, qps).dequantize()[rows]`` bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from shrinkjax.quant.array import (
    PACK_UNIT,
    QuantizedArray,
    QuantSpec,
    pack,
    unpack,
)

__all__ = [
    "Format",
    "QuantSpec",
    "floor_log2",
    "get",
    "make",
    "names",
    "pow2",
    "register",
    "store_scale",
]

_FACTORIES: dict[str, Callable[[QuantSpec], Format]] = {}
_BUILTIN_MODULES = ("intk", "fp8", "nf4", "mx")
_loaded = False


def register(name: str):
    """Decorator registering ``factory(spec) -> Format`` under ``name``."""

    def deco(factory):
        if name in _FACTORIES:
            raise ValueError(f"quantization format {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return deco


def _load_builtin():
    global _loaded
    if not _loaded:
        _loaded = True
        for m in _BUILTIN_MODULES:
            importlib.import_module(f"{__name__}.{m}")


def names() -> tuple[str, ...]:
    """All registered format names, sorted."""
    _load_builtin()
    return tuple(sorted(_FACTORIES))


def get(name: str, **opts) -> Format:
    """The format ``name`` with options, e.g. ``get("int4", group_size=64, symmetric=False)``."""
    _load_builtin()
    if name not in _FACTORIES:
        raise KeyError(f"unknown quantization format {name!r}; known formats: {list(names())}")
    return make(QuantSpec(format=name, **opts))


@functools.cache
def make(spec: QuantSpec) -> Format:
    """The (cached) format object for ``spec``; its ``.spec`` has every default resolved."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"make() takes a QuantSpec, got {type(spec).__name__}")
    _load_builtin()
    if spec.format not in _FACTORIES:
        raise KeyError(
            f"unknown quantization format {spec.format!r}; known formats: {list(names())}"
        )
    fmt = _FACTORIES[spec.format](spec)
    # specs that resolve to the same thing share one object (and its compiled programs)
    return _RESOLVED.setdefault(fmt.spec, fmt)


_RESOLVED: dict[QuantSpec, Format] = {}


# ---------------------------------------------------------------------------------------------
# Exact bit-level helpers shared by the formats.


def floor_log2(a):
    """floor(log2(a)) for finite f32 ``a >= 0``, exact, from the exponent bits (int32).

    Zero and subnormals give -127 (anything below 2**-126 behaves as "tiny")."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(a, jnp.float32), jnp.int32)
    return ((bits >> 23) & 0xFF) - 127


def pow2(e):
    """2.0**e as f32 for integer ``e`` in [-149, 127], exact (built from the bit pattern)."""
    e = jnp.asarray(e, jnp.int32)
    normal = (jnp.clip(e, -126, 127) + 127) << 23
    sub = jnp.left_shift(jnp.int32(1), jnp.clip(e + 149, 0, 22))
    return jax.lax.bitcast_convert_type(jnp.where(e >= -126, normal, sub), jnp.float32)


def store_scale(s, dtype: str):
    """Cast positive f32 scales to ``dtype`` rounding *up* (so ``|w| / s`` never overflows the
    grid); zero scales (all-zero groups) become 1, overflow saturates at the dtype's max."""
    s = jnp.asarray(s, jnp.float32)
    s = jnp.where(s > 0, s, 1.0)
    dt = jnp.dtype(dtype)
    if dt == jnp.float32:
        return s
    fmax = float(jnp.finfo(dt).max)
    q = jnp.minimum(s, fmax).astype(dt)
    q = jnp.where(q.astype(jnp.float32) < s, jnp.nextafter(q, jnp.asarray(jnp.inf, dt)), q)
    return jnp.minimum(q, jnp.asarray(fmax, dt))


# ---------------------------------------------------------------------------------------------


class Format:
    """Base class: group-wise scaled element codes along K. Weights must be finite.

    Subclasses set ``name``-independent class attributes and implement the four hooks
    ``_fit``, ``_effective``, ``_encode_elems``, ``_decode_elems``; everything else (shape
    checks, grouping, packing, GPTQ primitives, jitted RTN) lives here.
    """

    bits: int  # bits per element code
    granularities: tuple[str, ...] = ("tensor", "channel", "group")
    default_granularity: str = "group"
    default_group_size: int | None = 128
    fixed_group_size: int | None = None  # set when the format fixes the block (MX, NVFP4)
    default_scale_dtype: str | None = "float32"  # None: scale encoding fixed by the format
    tensor_keys: tuple[str, ...] = ()
    # K need not be a multiple of group_size: ceil(K/G) groups, the last one shorter
    # (AutoGPTQ/AWQ style; int-k). Other formats keep K % G == 0.
    ragged_groups: bool = False

    def __init__(self, spec: QuantSpec):
        self.spec = self._resolve(spec)
        # Public entry points run compiled (one XLA program each, cached per shape): eager
        # op-by-op execution is slow, and identical programs keep fake_quant == dequantize.
        self._fit_jit = jax.jit(self._fit_impl)
        self._fake_quant_jit = jax.jit(self._fake_quant_impl)
        self._quantize_jit = jax.jit(self._quantize_impl)
        self._from_groups_jit = jax.jit(self._from_groups, static_argnums=2)
        self._dequantize_jit = jax.jit(self._dequantize_impl, static_argnums=1)

    # -- spec handling ------------------------------------------------------------------------
    def _resolve(self, spec: QuantSpec) -> QuantSpec:
        f = spec.format
        gran = spec.granularity or self.default_granularity
        if gran not in self.granularities:
            raise ValueError(
                f"{f}: granularity {gran!r} unsupported (supported: {self.granularities})"
            )
        gs = spec.group_size
        if gran == "group":
            gs = gs or self.fixed_group_size or self.default_group_size
            if self.fixed_group_size is not None and gs != self.fixed_group_size:
                raise ValueError(
                    f"{f}: the format fixes group_size={self.fixed_group_size}, got {gs}"
                )
        elif gs is not None:
            raise ValueError(f"{f}: group_size={gs} only applies to granularity='group'")
        sd = spec.scale_dtype
        if self.default_scale_dtype is None:
            if sd is not None:
                raise ValueError(
                    f"{f}: scale encoding is fixed by the format; got scale_dtype={sd}"
                )
        else:
            sd = sd or self.default_scale_dtype
        if not spec.symmetric and not self.supports_asymmetric:
            raise ValueError(f"{f}: symmetric=False is only supported by int-k formats")
        if spec.double_quant and not self.supports_double_quant:
            raise ValueError(f"{f}: double_quant is only supported by nf4")
        return dataclasses.replace(spec, granularity=gran, group_size=gs, scale_dtype=sd)

    supports_asymmetric = False
    supports_double_quant = False

    @property
    def name(self) -> str:
        return self.spec.format

    @property
    def qparam_keys(self) -> tuple[str, ...]:
        return ("scales",)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"

    # Value semantics, so a format can be a static argument of jax.jit.
    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.spec))

    # -- shapes -------------------------------------------------------------------------------
    def group_rows(self, k: int) -> int:
        """Input rows per fitted group for a K-row weight (``group_size``, or K)."""
        return self.spec.group_size if self.spec.granularity == "group" else k

    def _validate(self, w, what: str) -> None:
        if w.ndim != 2:
            raise ValueError(f"{self.name}: {what} must be 2-D [K, N], got shape {tuple(w.shape)}")
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise TypeError(f"{self.name}: {what} must be floating point, got {w.dtype}")

    def _as_weight(self, w, what: str):
        w = jnp.asarray(w)
        self._validate(w, what)
        return w.astype(jnp.float32)

    def check_shape(self, shape) -> None:
        """Raise a ValueError naming ``shape`` unless a ``[K, N]`` weight of it is quantizable."""
        if len(shape) != 2:
            raise ValueError(f"{self.name}: weight must be 2-D [K, N], got shape {tuple(shape)}")
        k, _ = shape
        g = self.group_rows(k)
        if k % g and not self.ragged_groups:
            raise ValueError(
                f"{self.name}: weight of shape {tuple(shape)} [K, N]: K={k} is not divisible by "
                f"group_size={g}"
            )
        unit = PACK_UNIT[self.bits]
        if k % unit:
            raise ValueError(
                f"{self.name}: weight of shape {tuple(shape)} [K, N]: K={k} is not a multiple of "
                f"{unit} ({self.bits}-bit codes are packed {unit} per unit along K)"
            )

    def n_groups(self, k: int) -> int:
        """Groups (qparam rows) of a K-row weight: ``ceil(K / group_rows(K))``."""
        return -(-k // self.group_rows(k))

    def _n_groups(self, r: int) -> int:
        """Groups in R rows for ``fit``."""
        if self.spec.granularity != "group":
            return 1
        g = self.spec.group_size
        if r % g and not self.ragged_groups:
            raise ValueError(f"{self.name}: fit() got {r} rows, not a multiple of group_size={g}")
        return -(-r // g)

    def _rows_per_group(self, r: int, g: int, what: str) -> int:
        """Rows per group when R rows are split into g qparam groups: all R for g = 1, else
        ``group_size`` when g = ceil(R / group_size) and the format allows a short last group,
        else R / g equal groups."""
        if g == 1:
            return r
        gs = self.spec.group_size
        if self.ragged_groups and self.spec.granularity == "group" and g == -(-r // gs):
            return gs
        if r % g:
            raise ValueError(
                f"{self.name}: {what} got {r} rows for qparams of {g} groups "
                f"(rows must be a multiple of the group count)"
            )
        return r // g

    @staticmethod
    def _to_groups(w_RxN, g: int, rows: int):
        """``[R, N]`` -> ``[g, rows, N]``; a short last group is padded by repeating the last
        row (max/min/absmax of the group unchanged; padded results are sliced off)."""
        r, n = w_RxN.shape
        if g * rows > r:
            w_RxN = jnp.pad(w_RxN, ((0, g * rows - r), (0, 0)), mode="edge")
        return w_RxN.reshape(g, rows, n)

    @staticmethod
    def _from_groups_rows(x_gxGxN, r: int):
        """Inverse of :meth:`_to_groups`: ``[g, G, N]`` -> the first R rows ``[R, N]``."""
        return x_gxGxN.reshape(-1, x_gxGxN.shape[-1])[:r]

    # -- GPTQ primitives ----------------------------------------------------------------------
    def fit(self, w_RxN, *, tensor_amax=None) -> dict[str, jax.Array]:
        """qparams for R rows: one group (R = group size, as GPTQ calls it) or R / G groups.

        ``tensor_amax`` (max |W| of the whole tensor) fixes tensor-level scales (NVFP4); when
        None it is taken from ``w_RxN`` itself. Jittable."""
        return self._fit_jit(jnp.asarray(w_RxN), tensor_amax)

    def _fit_impl(self, w_RxN, tensor_amax):
        w = self._as_weight(w_RxN, "fit() input")
        r, n = w.shape
        g = self._n_groups(r)
        if tensor_amax is None:
            tensor_amax = jnp.max(jnp.abs(w))
        rows = self._rows_per_group(r, g, "fit()")
        return self._fit(self._to_groups(w, g, rows), jnp.asarray(tensor_amax, jnp.float32))

    def fake_quant(self, w_RxN, qparams: Mapping[str, jax.Array]) -> jax.Array:
        """Round R rows to the grid of fixed qparams and dequantize (f32 [R, N]). Jittable.

        qparams with one row apply to every row (R = 1 for GPTQ's row loop); with g rows,
        R must be a multiple of g and rows are split into g consecutive equal groups."""
        return self._fake_quant_jit(jnp.asarray(w_RxN), dict(qparams))

    def _fake_quant_impl(self, w_RxN, qparams):
        w = self._as_weight(w_RxN, "fake_quant() input")
        qp = self._check_qparams(qparams, n=w.shape[1])
        r, _ = w.shape
        g = self._qparam_rows(qp)
        x = self._to_groups(w, g, self._rows_per_group(r, g, "fake_quant()"))
        scale, zero = self._expanded(qp)
        codes = self._encode(x, scale, zero)
        return self._from_groups_rows(self._decode(codes, scale, zero), r)

    def from_groups(
        self, w_KxN, qparams: Mapping[str, jax.Array] | Sequence[Mapping[str, jax.Array]]
    ) -> QuantizedArray:
        """Encode the final codes of ``w_KxN`` with given per-group qparams (a list of
        per-group dicts, or one dict stacked along the group axis)."""
        w = jnp.asarray(w_KxN)
        self._validate(w, "weight")
        self.check_shape(w.shape)
        return self._from_groups_jit(w, self.stack(qparams), str(w.dtype))

    def stack(
        self, qparams: Mapping[str, jax.Array] | Sequence[Mapping[str, jax.Array]]
    ) -> dict[str, jax.Array]:
        """Concatenate per-group qparams along the group axis (tensor keys: one row kept)."""
        if isinstance(qparams, Mapping):
            out = {}
            for key, v in qparams.items():
                v = jnp.asarray(v)
                if v.ndim == 3 and v.shape[1] == 1:  # jnp.stack of [1, N] rows
                    v = v.reshape(v.shape[0], v.shape[2])
                if key in self.tensor_keys and v.shape[0] > 1:
                    _check_equal_rows(self.name, key, v)
                    v = v[:1]
                out[key] = v
            return out
        qparams = list(qparams)
        if not qparams:
            raise ValueError(f"{self.name}: from_groups() got an empty list of qparams")
        keys = set(qparams[0])
        for i, q in enumerate(qparams):
            if set(q) != keys:
                raise ValueError(
                    f"{self.name}: qparams[{i}] has keys {sorted(q)}, expected {sorted(keys)}"
                )
        out = {}
        for key in sorted(keys):
            v = jnp.concatenate([jnp.asarray(q[key]) for q in qparams], axis=0)
            out[key] = v
        return self.stack(out)

    # -- RTN / dequantization -----------------------------------------------------------------
    def quantize(self, w_KxN, **opts) -> QuantizedArray:
        """Round-to-nearest quantization of ``w_KxN``; ``opts`` override spec fields."""
        if opts:
            return make(self.spec.replace(**opts)).quantize(w_KxN)
        w = jnp.asarray(w_KxN)
        self._validate(w, "weight")
        self.check_shape(w.shape)
        return self._quantize_jit(w)

    def _quantize_impl(self, w_KxN):
        dtype = str(w_KxN.dtype)
        w = w_KxN.astype(jnp.float32)
        return self._from_groups(w, self._fit_impl(w, None), dtype)

    def dequantize(self, q: QuantizedArray, dtype=jnp.float32) -> jax.Array:
        if q.spec != self.spec:
            raise ValueError(f"QuantizedArray of {q.spec} given to format {self.spec}")
        return self._dequantize_jit(q, jnp.dtype(dtype))

    def _dequantize_impl(self, q: QuantizedArray, dtype):
        k, n = q.shape
        codes = unpack(q.codes, self.bits, k)
        qp = {key: getattr(q, key) for key in self.qparam_keys}
        g = self._qparam_rows(qp)
        scale, zero = self._expanded(qp)
        c = self._to_groups(codes, g, self._rows_per_group(k, g, "dequantize()"))
        return self._from_groups_rows(self._decode(c, scale, zero), k).astype(dtype)

    # -- internals ----------------------------------------------------------------------------
    def _from_groups(self, w, qp, dtype: str) -> QuantizedArray:
        w = w.astype(jnp.float32)
        k, n = w.shape
        qp = self._check_qparams(qp, n=n)
        g = self._qparam_rows(qp)
        want = self.n_groups(k)
        if g != want:
            raise ValueError(
                f"{self.name}: weight of shape {(k, n)} needs qparams for {want} groups of "
                f"{self.group_rows(k)} rows, got {g}"
            )
        scale, zero = self._expanded(qp)
        x = self._to_groups(w, g, self.group_rows(k))
        codes = self._from_groups_rows(self._encode(x, scale, zero), k)
        return QuantizedArray(
            codes=pack(codes, self.bits), spec=self.spec, shape=(k, n), dtype=dtype, **qp
        )

    def _check_qparams(self, qparams, n: int) -> dict[str, jax.Array]:
        missing = [key for key in self.qparam_keys if qparams.get(key) is None]
        extra = sorted(set(qparams) - set(self.qparam_keys))
        if missing or extra:
            raise ValueError(
                f"{self.name}: qparams must have keys {list(self.qparam_keys)}; "
                f"missing {missing}, unexpected {extra}"
            )
        out = {key: jnp.asarray(qparams[key]) for key in self.qparam_keys}
        for key, v in out.items():
            if v.ndim != 2:
                raise ValueError(f"{self.name}: qparams[{key!r}] must be 2-D, got {v.shape}")
        sc = out["scales"]
        if sc.shape[1] not in (1, n):
            raise ValueError(
                f"{self.name}: qparams['scales'] of shape {sc.shape} do not fit N={n} columns"
            )
        return out

    def _qparam_rows(self, qp) -> int:
        return qp["scales"].shape[0]

    def _expanded(self, qp):
        """Effective f32 (scale, zero) broadcastable against ``[g, G, N]``."""
        scale, zero = self._effective(qp)
        return scale[:, None, :], (None if zero is None else zero[:, None, :])

    def _encode(self, x_gxGxN, scale, zero):
        v = jnp.where(scale > 0, x_gxGxN / jnp.where(scale > 0, scale, 1.0), 0.0)
        return self._encode_elems(v, zero)

    def _decode(self, codes, scale, zero):
        return self._decode_elems(codes, zero) * scale

    # -- hooks --------------------------------------------------------------------------------
    def _fit(self, x_gxGxN, tensor_amax) -> dict[str, jax.Array]:
        raise NotImplementedError

    def _effective(self, qp) -> tuple[jax.Array, jax.Array | None]:
        """f32 ``(scale [g, Nc], zero [g, Nc] or None)`` from stored qparams."""
        raise NotImplementedError

    def _encode_elems(self, v, zero) -> jax.Array:
        """uint8 codes of scaled values ``v = w / scale``."""
        raise NotImplementedError

    def _decode_elems(self, codes, zero) -> jax.Array:
        """f32 grid values (times ``scale`` gives the weight)."""
        raise NotImplementedError


def _check_equal_rows(name: str, key: str, v) -> None:
    try:
        a = np.asarray(v)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return  # traced (inside jit): cannot check; the first row is used
    if not (a == a[:1]).all():
        raise ValueError(
            f"{name}: qparams[{key!r}] is a per-tensor parameter but differs between groups; "
            f"fit every group with the same tensor_amax (e.g. max |W|)"
        )


def reduce_groups(x_gxGxN, fn, per_tensor: bool):
    """Reduce over the rows of each group -> [g, N] (or [g, 1] per-tensor)."""
    return fn(x_gxGxN, axis=(1, 2) if per_tensor else 1, keepdims=per_tensor).reshape(
        x_gxGxN.shape[0], -1
    )
