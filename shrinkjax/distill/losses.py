"""Distillation losses: pure functions of student/teacher logits and a token mask.

Every function works in float32 whatever the logits' dtype, treats the token axes as one flat
axis of N tokens, and processes it in chunks of ``chunk`` tokens (a ``lax.scan`` whose body is
rematerialised), so the [N, V] intermediates of a large vocabulary exist one chunk at a time in
the forward *and* the backward pass. :func:`loss_from_hidden` goes one step further and never
materialises the full logits: it calls the heads on each chunk of final hidden states.

Divergences, on τ-softened distributions p = softmax(logits / τ), each multiplied by τ²
(Hinton et al., 2015, so that gradient magnitudes do not depend on τ):

* ``forward_kl``  KL(p_T ‖ p_S) = Σ p_T (log p_T − log p_S) (mode covering)
* ``reverse_kl``  KL(p_S ‖ p_T) (mode seeking)
* ``jsd``         generalized JSD(β) of GKD (Agarwal et al., 2024), with the mixture
                  m = β p_T + (1 − β) p_S: β KL(p_T ‖ m) + (1 − β) KL(p_S ‖ m). As in the
                  reference implementation (TRL's ``generalized_jsd_loss``), β = 0 *is* forward
                  KL and β = 1 *is* reverse KL (the mixture formula itself vanishes at both ends).

``tau`` here is the *loss* temperature. It is unrelated to the *sampling* temperature used
when a teacher or student generates text (``distill.sequence.temperature``,
``distill.onpolicy.temperature``).

The training loss blends the divergence with hard-label cross entropy (at τ = 1):
``loss = alpha · CE + (1 − alpha) · D``. ``teacher_top_k`` > 0 keeps only the teacher's k
largest logits (the others get probability 0, the rest renormalised); reverse KL is undefined
then (p_T = 0 where p_S > 0) and is rejected.

Masks mark the tokens whose *prediction* is scored: logits at position i predict ``labels[i]``
(the caller shifts; see :func:`next_token_targets`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "none")
TERMS = ("ce", "fkl", "rkl", "jsd")  # the order of a dynamic ``weights`` vector


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static description of the logit loss (hashable: jit closes over it)."""

    alpha: float = 0.0  # weight of hard-label cross entropy; the divergence gets 1 - alpha
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd | none (CE only)
    tau: float = 1.0  # loss temperature (softens both distributions; τ² scaling)
    beta: float = 0.5  # JSD(β): 0 = forward KL, 1 = reverse KL
    teacher_top_k: int = 0  # 0 = full teacher distribution
    chunk: int = 4096  # tokens per chunk (0 = no chunking)
    jsd_normalize: bool = False  # JSD(β) / (β(1 − β)): KL's curvature at p_S = p_T

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.tau <= 0:
            raise ValueError(f"tau (loss temperature) must be > 0, got {self.tau}")
        if self.teacher_top_k < 0 or self.chunk < 0:
            raise ValueError("teacher_top_k and chunk must be >= 0")
        if self.teacher_top_k and self._kind() == "rkl":
            raise ValueError(
                "teacher_top_k with reverse KL is undefined: the truncated teacher gives "
                "probability 0 to tokens the student may sample; use forward_kl or jsd"
            )

    def _kind(self) -> str | None:
        """The divergence term actually computed (β at an end of [0, 1] is a plain KL)."""
        if self.divergence == "none" or self.alpha == 1.0:
            return None
        if self.divergence == "jsd":
            return "fkl" if self.beta == 0.0 else "rkl" if self.beta == 1.0 else "jsd"
        return {"forward_kl": "fkl", "reverse_kl": "rkl"}[self.divergence]

    def weights(self) -> dict[str, float]:
        """Static weights of the terms (zero-weight terms are not computed)."""
        w = {"ce": float(self.alpha)}
        kind = self._kind()
        if kind is not None:
            w[kind] = 1.0 - float(self.alpha)
        return {k: v for k, v in w.items() if v != 0.0}

    @property
    def needs_teacher(self) -> bool:
        return self._kind() is not None


def weight_vector(cfg: LossConfig) -> jax.Array:
    """The static weights as a dynamic [4] vector over :data:`TERMS` (for mixed-arm steps)."""
    w = cfg.weights()
    return jnp.asarray([w.get(t, 0.0) for t in TERMS], jnp.float32)


# ----------------------------------------------------------------------------- per token


def _log_softmax(logits, tau):
    return jax.nn.log_softmax(logits.astype(jnp.float32) / tau, axis=-1)


def _truncate_top_k(t_logits_CxV, k: int):
    if not k or k >= t_logits_CxV.shape[-1]:
        return t_logits_CxV
    kth = jax.lax.top_k(t_logits_CxV, k)[0][..., -1:]
    return jnp.where(t_logits_CxV >= kth, t_logits_CxV, -jnp.inf)


def token_terms(
    s_logits_CxV,
    t_logits_CxV,
    labels_C,
    terms,
    *,
    tau=1.0,
    beta=0.5,
    teacher_top_k: int = 0,
    with_kl: bool = False,
    jsd_normalize: bool = False,
) -> dict[str, jax.Array]:
    """Per-token values [C] of the requested ``terms`` (subset of :data:`TERMS`), without τ²
    (``jsd`` divided by β(1 − β) with ``jsd_normalize``, β strictly inside (0, 1)).

    ``with_kl`` adds ``kl``: KL(p_T ‖ p_S) at τ = 1 on the full distributions, as a metric
    (no gradient).
    """
    out = {}
    if "ce" in terms:
        ls1 = _log_softmax(s_logits_CxV, 1.0)
        out["ce"] = -jnp.take_along_axis(ls1, labels_C[:, None].astype(jnp.int32), -1)[:, 0]
    div_terms = [t for t in terms if t != "ce"]
    if div_terms or with_kl:
        t_logits_CxV = jax.lax.stop_gradient(t_logits_CxV.astype(jnp.float32))
    if div_terms:
        ls = _log_softmax(s_logits_CxV, tau)
        lt = _log_softmax(_truncate_top_k(t_logits_CxV, teacher_top_k), tau)
        pt = jnp.exp(lt)
        lt_safe = jnp.where(pt > 0, lt, 0.0)  # log p_T is -inf outside a top-k
        if "fkl" in div_terms:
            out["fkl"] = jnp.sum(jnp.where(pt > 0, pt * (lt_safe - ls), 0.0), -1)
        if "rkl" in div_terms or "jsd" in div_terms:
            ps = jnp.exp(ls)
        if "rkl" in div_terms:
            out["rkl"] = jnp.sum(ps * (ls - lt), -1)
        if "jsd" in div_terms:
            beta = jnp.asarray(beta, jnp.float32)
            lm = jnp.logaddexp(ls + jnp.log1p(-beta), lt + jnp.log(beta))
            kl_t = jnp.sum(jnp.where(pt > 0, pt * (lt_safe - lm), 0.0), -1)
            kl_s = jnp.sum(ps * (ls - lm), -1)
            jsd = beta * kl_t + (1.0 - beta) * kl_s
            if jsd_normalize:  # β at 0 or 1: the term vanishes, nothing to normalise
                inner = beta * (1.0 - beta)
                jsd = jsd / jnp.where(inner > 0, inner, 1.0)
            out["jsd"] = jsd
    same = isinstance(tau, int | float) and tau == 1.0 and not teacher_top_k
    if with_kl and same and "fkl" in out:  # the loss term already is the metric
        out["kl"] = jax.lax.stop_gradient(out["fkl"])
    elif with_kl:
        ls1 = jax.lax.stop_gradient(_log_softmax(s_logits_CxV, 1.0))
        lt1 = _log_softmax(t_logits_CxV, 1.0)
        out["kl"] = jnp.sum(jnp.exp(lt1) * (lt1 - ls1), -1)
    return out


# ----------------------------------------------------------------------------- chunking


def chunked_sums(
    fn: Callable, arrays: tuple, mask_N, chunk: int, term_masks: dict | None = None
) -> dict[str, jax.Array]:
    """Σ_n mask[n] · fn(*chunk_of_arrays)[key][n] for every key, plus ``count`` = Σ mask.

    ``arrays`` share a leading token axis N; ``fn`` maps [C, ...] chunks to {key: [C]}.
    ``term_masks`` {key: [N]} replaces ``mask`` for those keys (e.g. cross entropy only on
    the tokens that are real labels); ``count`` stays Σ mask. The chunks run in a
    ``lax.scan`` with a rematerialised body, so per-chunk intermediates are never stored for
    the backward pass.
    """
    n = mask_N.shape[0]
    ws = {"": mask_N.astype(jnp.float32)}
    ws.update({k: m.astype(jnp.float32) for k, m in (term_masks or {}).items()})

    def sums(xs, wc):
        return {k: jnp.sum(v * wc.get(k, wc[""])) for k, v in fn(*xs).items()}

    if not chunk or n <= chunk:
        out = sums(arrays, ws)
    else:
        pad = (-n) % chunk
        if pad:
            arrays = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in arrays)
            ws = {k: jnp.pad(w, (0, pad)) for k, w in ws.items()}
        nc = (n + pad) // chunk
        xs = tuple(x.reshape(nc, chunk, *x.shape[1:]) for x in arrays)
        wcs = {k: w.reshape(nc, chunk) for k, w in ws.items()}
        body_fn = jax.checkpoint(sums)
        shapes = jax.eval_shape(sums, tuple(x[0] for x in xs), {k: w[0] for k, w in wcs.items()})
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(carry, c):
            got = body_fn(c[0], c[1])
            return jax.tree.map(jnp.add, carry, got), None

        out, _ = jax.lax.scan(body, init, (xs, wcs))
    out["count"] = jnp.sum(mask_N.astype(jnp.float32))
    return out


def _flat(x, trailing: int):
    return x.reshape((-1,) + x.shape[x.ndim - trailing :]) if trailing else x.reshape(-1)


# ----------------------------------------------------------------------------- public losses


def _mean(fn, arrays, mask, chunk):
    s = chunked_sums(fn, arrays, _flat(mask, 0), chunk)
    return s, jnp.maximum(s["count"], 1.0)


def cross_entropy(s_logits, labels, mask, *, chunk: int = 4096):
    """Mean hard-label cross entropy −log p_S(label) over masked tokens."""
    fn = lambda s, y: token_terms(s, None, y, ("ce",))
    s, c = _mean(fn, (_flat(s_logits, 1), _flat(labels, 0)), mask, chunk)
    return s["ce"] / c


def _divergence(term, s_logits, t_logits, mask, tau, beta, top_k, chunk):
    fn = lambda s, t: token_terms(s, t, None, (term,), tau=tau, beta=beta, teacher_top_k=top_k)
    s, c = _mean(fn, (_flat(s_logits, 1), _flat(t_logits, 1)), mask, chunk)
    return tau**2 * s[term] / c


def forward_kl(s_logits, t_logits, mask, *, tau=1.0, teacher_top_k: int = 0, chunk: int = 4096):
    """τ² · mean KL(p_T ‖ p_S) over masked tokens."""
    return _divergence("fkl", s_logits, t_logits, mask, tau, 0.0, teacher_top_k, chunk)


def reverse_kl(s_logits, t_logits, mask, *, tau=1.0, chunk: int = 4096):
    """τ² · mean KL(p_S ‖ p_T) over masked tokens."""
    return _divergence("rkl", s_logits, t_logits, mask, tau, 0.0, 0, chunk)


def generalized_jsd(
    s_logits,
    t_logits,
    mask,
    *,
    beta=0.5,
    tau=1.0,
    teacher_top_k: int = 0,
    chunk: int = 4096,
    normalize: bool = False,
):
    """τ² · mean JSD(β) over masked tokens; β = 0 is forward KL, β = 1 reverse KL.
    ``normalize``: divided by β(1 − β) (see the module docstring)."""
    if isinstance(beta, int | float) and beta in (0.0, 1.0):
        if beta == 0.0:
            return forward_kl(
                s_logits, t_logits, mask, tau=tau, teacher_top_k=teacher_top_k, chunk=chunk
            )
        return reverse_kl(s_logits, t_logits, mask, tau=tau, chunk=chunk)
    fn = lambda s, t: token_terms(
        s,
        t,
        None,
        ("jsd",),
        tau=tau,
        beta=beta,
        teacher_top_k=teacher_top_k,
        jsd_normalize=normalize,
    )
    s, c = _mean(fn, (_flat(s_logits, 1), _flat(t_logits, 1)), mask, chunk)
    return tau**2 * s["jsd"] / c


def blend(sums, weights, tau, count=None):
    """(loss, parts) from masked sums: parts are per-token means; divergences carry τ².

    ``count`` (default: the sums' own) is the token count to divide by: a microbatch of an
    accumulated step divides by the whole step's count, so accumulated gradients equal the
    full batch's.
    """
    count = jnp.maximum(sums["count"] if count is None else count, 1.0)
    parts = {}
    loss = jnp.zeros((), jnp.float32)
    for i, term in enumerate(TERMS):
        if term not in sums:
            continue
        mean = sums[term] / count * (1.0 if term == "ce" else jnp.asarray(tau, jnp.float32) ** 2)
        parts[term] = mean
        w = weights[i] if not isinstance(weights, dict) else weights.get(term, 0.0)
        loss = loss + w * mean
    if "kl" in sums:
        parts["kl"] = sums["kl"] / count
    parts["tokens"] = sums["count"]
    return loss, parts


def loss_sums(
    head_fn: Callable,
    arrays: tuple,
    mask,
    cfg: LossConfig,
    *,
    weights=None,
    tau=None,
    beta=None,
    with_kl: bool = False,
    ce_mask=None,
) -> dict[str, jax.Array]:
    """Masked sums of the loss terms; ``head_fn(*chunk) -> (s_logits, t_logits, labels)``.

    ``ce_mask`` (same shape as ``mask``, a subset of it): the tokens whose cross entropy
    counts (default: ``mask``); e.g. the prompt of an on-policy sequence, not the student's
    own samples. Every term is still divided by the count of ``mask``.

    ``weights`` None: the config's static weights (zero-weight terms skipped). A [4] array over
    :data:`TERMS`: every term is computed and weighted at run time (one compiled step for
    several loss mixes).
    """
    tau = cfg.tau if tau is None else tau
    beta = cfg.beta if beta is None else beta
    terms = tuple(cfg.weights()) if weights is None else TERMS
    if weights is not None and cfg.teacher_top_k:
        terms = tuple(t for t in TERMS if t != "rkl")

    def fn(*xs):
        s, t, y = head_fn(*xs)
        return token_terms(
            s,
            t,
            y,
            terms,
            tau=tau,
            beta=beta,
            teacher_top_k=cfg.teacher_top_k,
            with_kl=with_kl and t is not None,
            jsd_normalize=cfg.jsd_normalize,
        )

    tm = None if ce_mask is None else {"ce": _flat(ce_mask, 0)}
    return chunked_sums(fn, arrays, _flat(mask, 0), cfg.chunk, tm)


def distill_loss(
    s_logits,
    t_logits,
    labels,
    mask,
    cfg: LossConfig = LossConfig(),
    *,
    weights=None,
    tau=None,
    beta=None,
    with_kl: bool = True,
):
    """(loss, parts) = alpha · CE + (1 − alpha) · τ² · D, means over masked tokens.

    ``parts`` holds each computed term's mean (``ce``, ``fkl``/``rkl``/``jsd`` with τ²),
    ``kl`` (KL(p_T ‖ p_S) at τ = 1, a metric) and ``tokens``. ``t_logits`` may be None when
    no divergence is needed (``alpha = 1`` or ``divergence = 'none'``).
    """
    w = cfg.weights() if weights is None else weights
    if t_logits is None:
        if weights is not None or cfg.needs_teacher:
            raise ValueError("this loss needs teacher logits")
        arrays = (_flat(s_logits, 1), _flat(labels, 0))
        head = lambda s, y: (s, None, y)
    else:
        arrays = (_flat(s_logits, 1), _flat(t_logits, 1), _flat(labels, 0))
        head = lambda s, t, y: (s, t, y)
    sums = loss_sums(head, arrays, mask, cfg, weights=weights, tau=tau, beta=beta, with_kl=with_kl)
    return blend(sums, w, cfg.tau if tau is None else tau)


def loss_from_hidden(
    h_student,
    h_teacher,
    labels,
    mask,
    s_head: Callable,
    t_head: Callable | None,
    cfg: LossConfig = LossConfig(),
    *,
    weights=None,
    tau=None,
    beta=None,
    with_kl: bool = True,
):
    """Like :func:`distill_loss` from final hidden states [.., D]: the heads map a chunk of
    hidden states [C, D] to f32 logits [C, V], so full [N, V] logits never exist."""
    w = cfg.weights() if weights is None else weights
    if t_head is None or h_teacher is None:
        if weights is not None or cfg.needs_teacher:
            raise ValueError("this loss needs the teacher's hidden states and head")
        arrays = (_flat(h_student, 1), _flat(labels, 0))
        head = lambda hs, y: (s_head(hs), None, y)
    else:
        arrays = (_flat(h_student, 1), _flat(h_teacher, 1), _flat(labels, 0))
        head = lambda hs, ht, y: (s_head(hs), t_head(ht), y)
    sums = loss_sums(head, arrays, mask, cfg, weights=weights, tau=tau, beta=beta, with_kl=with_kl)
    return blend(sums, w, cfg.tau if tau is None else tau)


def hidden_mse(h_student, h_teacher, mask, proj=None):
    """Mean over masked tokens of the mean squared error between (projected) student and
    teacher hidden states; ``proj`` [D_s, D_t] maps student width to teacher width."""
    hs = h_student.astype(jnp.float32)
    if proj is not None:
        hs = hs @ proj.astype(jnp.float32)
    ht = jax.lax.stop_gradient(h_teacher.astype(jnp.float32))
    if hs.shape != ht.shape:
        raise ValueError(
            f"hidden widths differ ({hs.shape[-1]} vs {ht.shape[-1]}): give a projection"
        )
    per_tok = jnp.mean((hs - ht) ** 2, -1)
    w = mask.astype(jnp.float32)
    return jnp.sum(per_tok * w) / jnp.maximum(jnp.sum(w), 1.0)


def next_token_targets(tokens_BxL, loss_mask_BxL):
    """(labels [B, L], mask [B, L]) for causal LM: position i predicts token i + 1; the last
    position scores nothing. ``loss_mask`` marks tokens that are *targets*."""
    labels = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros_like(tokens_BxL[:, :1])], 1)
    m = jnp.concatenate([loss_mask_BxL[:, 1:], jnp.zeros_like(loss_mask_BxL[:, :1])], 1)
    return labels, m.astype(bool)
