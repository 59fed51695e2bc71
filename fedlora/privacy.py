"""Differential privacy for adapter updates: clipping, noise, adaptive clipping and a privacy
accountant (Google's ``dp-accounting``), composed with fedlora's codecs (``upload=delta``).

* Client (:func:`privatize`, between the method's ``client_train`` and the encode): the update
  over the uploaded tensors is clipped to C (L2 for Gaussian, L1 for Laplace noise);
  ``dp=local`` also adds the noise (scale z·2C) and sends no data-dependent metadata. The codec
  runs after this (post-processing).
* Server (:meth:`ServerPrivacy.round_config` before a round: the accountant charges it, or the
  round is not sent past ``dp-target-epsilon``; :meth:`ServerPrivacy.server_step` after
  decoding, ``dp=central``): every update clipped to C again, summed, N(0, (z·C)²) added, divided
  by the nodes sampled (an unweighted mean, one pseudo-reply); ``dp-adaptive-clip`` moves C
  toward ``dp-target-quantile`` (Andrew et al. 2019).
Noise comes from numpy's PCG64 seeded from OS entropy, never from the run's ``seed``. The
guarantee and each step in detail: docs/privacy.md ("Where each step sits in a round").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .config import check_at_least, settings_view
from .strategies.protocol import DPInstruction, TrainReply

log = logging.getLogger("flwr.fedlora")

MODES = ("off", "central", "local")
MECHANISMS = ("gaussian", "laplace")
#: a noise multiplier the calibration will not go past: the model would be noise
MAX_NOISE_MULTIPLIER = 1e3
#: relative slack of the budget check (the accountant's float rounding, not privacy)
BUDGET_RTOL = 1e-9


class PrivacyBudgetError(ValueError):
    """The target ε cannot be met with these settings (the run refuses to start)."""


# ============================================================================ settings


@dataclass(frozen=True)
class DPSettings:
    """The run's ``dp-*`` keys, validated."""

    mode: str              # dp
    mechanism: str         # dp-mechanism
    clip: float            # dp-clip
    noise_multiplier: float
    target_epsilon: float
    delta: float
    adaptive: bool         # dp-adaptive-clip
    target_quantile: float
    clip_lr: float
    count_stddev: float

    @classmethod
    def from_config(cls, cfg: Any) -> "DPSettings":
        """From a :class:`~fedlora.config.RunConfig` (``dp-<field>``); a ValueError names a bad
        key."""
        s = settings_view(cls, cfg, prefix="dp_",
                          renames={"mode": "dp", "adaptive": "dp_adaptive_clip"})
        s.validate()
        return s

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def validate(self) -> None:
        """Raise ValueError naming the first bad ``dp-*`` value."""
        if self.mode not in MODES:
            raise ValueError(f"run-config 'dp' must be one of {MODES}, got {self.mode!r}")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"run-config 'dp-mechanism' must be one of {MECHANISMS}, got "
                             f"{self.mechanism!r}")
        if not self.enabled:
            return
        if self.mechanism == "laplace" and self.mode != "local":
            raise ValueError("dp-mechanism='laplace' is local DP (as LoRA-A2/APPFL): use dp='local'"
                             " (central DP adds Gaussian noise)")
        check_at_least("dp-clip", self.clip, strict=True)
        check_at_least("dp-noise-multiplier", self.noise_multiplier)
        check_at_least("dp-target-epsilon", self.target_epsilon, note="0: use dp-noise-multiplier")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"run-config 'dp-delta' must be in (0, 1), got {self.delta}")
        if self.adaptive and self.mode != "central":
            raise ValueError("dp-adaptive-clip needs dp='central' (the clipped-count query is "
                             "noised by the server)")
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError(f"run-config 'dp-target-quantile' must be in [0, 1], got "
                             f"{self.target_quantile}")
        check_at_least("dp-clip-lr", self.clip_lr, strict=True)
        check_at_least("dp-count-stddev", self.count_stddev, note="0: sampled/20")


# ============================================================================ clipping and noise


def norm(tensors: Mapping[str, np.ndarray], order: int = 2) -> float:
    """L2 (``order`` 2: the hostile-node guard's :func:`~.strategies.guard.update_norm`, the one
    update norm of the project) or L1 (``order`` 1) norm over all tensors, in float64."""
    if order == 2:
        from .strategies import guard  # (torch via adapters: not on the launcher's check path)

        return guard.update_norm(tensors)
    return float(sum(np.abs(np.asarray(v, dtype=np.float64).ravel()).sum() for v in tensors.values()))


def clip(tensors: Mapping[str, np.ndarray], bound: float, order: int = 2
         ) -> "tuple[OrderedDict[str, np.ndarray], float, bool]":
    """``tensors`` scaled by min(1, bound/‖tensors‖) as float32 (norm ``order``: 2 or 1) with the
    guard's clip (:func:`~.strategies.guard.clip_update`), then shrunk by ulps until the norm is
    within ``bound`` (DP needs ≤ C exactly); returns (clipped, norm before, whether it was
    scaled). A zero update is left as it is."""
    from .strategies import guard

    n = norm(tensors, order)
    scale = guard.clip_scale(n, bound)
    out = guard.clip_update(tensors, scale)
    # float32 rounding can leave the norm a hair over the bound: shrink by ulps until it is not
    while norm(out, order) > bound:
        out = OrderedDict((k, np.nextafter(v, np.float32(0))) for k, v in out.items())
    return out, n, scale < 1.0


def add_noise(tensors: Mapping[str, np.ndarray], scale: float, rng: np.random.Generator,
              mechanism: str = "gaussian") -> "OrderedDict[str, np.ndarray]":
    """Every coordinate + N(0, scale²) (``gaussian``) or + Laplace(0, scale) (``laplace``),
    drawn and added in float64, returned as float32."""
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for k, v in tensors.items():
        v = np.asarray(v, dtype=np.float64)
        if mechanism == "gaussian":
            noise = rng.normal(0.0, scale, v.shape) if scale > 0 else 0.0
        elif mechanism == "laplace":
            noise = rng.laplace(0.0, scale, v.shape) if scale > 0 else 0.0
        else:
            raise ValueError(f"unknown noise mechanism {mechanism!r}")
        out[k] = (v + noise).astype(np.float32)
    return out


def local_noise_scale(clip_norm: float, noise_multiplier: float) -> float:
    """Local DP: standard deviation (Gaussian) or scale (Laplace) z·2C — 2C is how far apart the
    clipped updates of two different datasets of one client can be (L2 resp. L1)."""
    return noise_multiplier * 2.0 * clip_norm


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Adaptive clipping spends part of the budget on the noisy clipped count (std
    ``count_stddev``, sensitivity ½): the updates get z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) so that the two
    Gaussian queries together are one of multiplier z (Andrew et al. 2019, Thm 1; Flower's
    ``compute_adaptive_noise_params``). Needs z < 2σ_b; z = 0 gives 0."""
    if noise_multiplier == 0:
        return 0.0
    if count_stddev <= 0 or noise_multiplier >= 2 * count_stddev:
        raise PrivacyBudgetError(
            f"adaptive clipping with noise multiplier {noise_multiplier:.4g} needs the clipped "
            f"count's noise std (dp-count-stddev, default sampled/20) above "
            f"{noise_multiplier / 2:.4g}, got {count_stddev:.4g}; raise dp-count-stddev, sample "
            "more nodes per round or turn dp-adaptive-clip off")
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


def adaptive_clip(clip_norm: float, unclipped_fraction: float, target_quantile: float,
                  lr: float) -> float:
    """Geometric update C ← C·exp(−η(b̃ − γ)) of Andrew et al. 2019, with b̃ the (noisy) fraction
    of updates **not** clipped and γ the target quantile: C falls while more than γ of the updates
    fit under it and rises while fewer do, so it tracks the γ-quantile of the update norms.
    (Flower 1.41's ``_geometric_update`` feeds the fraction that *was* clipped into the same
    formula, which moves C away from the quantile.)"""
    return float(clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile)))


def noisy_unclipped_fraction(clipped: Sequence[bool], denominator: int, count_stddev: float,
                             rng: np.random.Generator) -> float:
    """b̃ = (Σ_i (b_i − ½) + N(0, σ_b²)) / m + ½ with b_i = 1 for an update that was not clipped
    (the centred sum has sensitivity ½ under add/remove of one client) and m the fixed
    denominator."""
    centred = sum((0.0 if c else 1.0) - 0.5 for c in clipped)
    noise = float(rng.normal(0.0, count_stddev)) if count_stddev > 0 else 0.0
    return (centred + noise) / max(denominator, 1) + 0.5


# ============================================================================ accounting


@contextlib.contextmanager
def _quiet_absl():
    """dp_accounting warns (via absl) for every fractional RDP order it drops; keep it quiet."""
    lg = logging.getLogger("absl")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def round_event(mode: str, mechanism: str, sample_rate: float, noise_multiplier: float):
    """The ``dp_accounting`` event of one round. Central: a Poisson-subsampled Gaussian with
    q = sampled/available (the usual approximation of Flower's fixed-size sampling; q = 1 is the
    plain Gaussian). Local: one Gaussian / Laplace release by each participating client, charged
    to every client every round (no amplification: the server sees who sent what)."""
    import dp_accounting

    if mode == "central":
        inner = dp_accounting.GaussianDpEvent(noise_multiplier)
        return inner if sample_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(sample_rate,
                                                                                    inner)
    if mechanism == "laplace":
        return dp_accounting.LaplaceDpEvent(noise_multiplier)
    return dp_accounting.GaussianDpEvent(noise_multiplier)


class Accountant:
    """RDP accounting (``dp_accounting.rdp.RdpAccountant``, add/remove-one neighbours) of the
    rounds run so far, kept as a ledger {(q, z): rounds}; each distinct event's RDP curve is
    computed once by the library and composed by counts (what ``compose(event, count)`` does)."""

    def __init__(self, mode: str, mechanism: str, delta: float) -> None:
        self.mode, self.mechanism, self.delta = mode, mechanism, delta
        self.ledger: dict[tuple[float, float], int] = {}
        self._curves: dict[tuple[float, float], np.ndarray] = {}
        self._orders: np.ndarray | None = None

    def _curve(self, q: float, z: float) -> np.ndarray:
        key = (float(q), float(z))
        if key not in self._curves:
            from dp_accounting.rdp import RdpAccountant

            acc = RdpAccountant()
            with _quiet_absl():
                acc.compose(round_event(self.mode, self.mechanism, q, z))
            self._curves[key] = acc.rdp
            self._orders = acc.orders
        return self._curves[key]

    def epsilon(self, ledger: Mapping[tuple[float, float], int] | None = None) -> float:
        """ε at ``delta`` after the rounds of ``ledger`` (default: the rounds run); 0 for none,
        inf when a round had no noise. Laplace (local): the smaller of the RDP bound and the pure
        composition Σ rounds/z (both are valid (ε, δ) bounds)."""
        from dp_accounting.rdp import rdp_privacy_accountant

        ledger = self.ledger if ledger is None else ledger
        items = [(q, z, n) for (q, z), n in ledger.items() if n > 0]
        if not items:
            return 0.0
        if any(z <= 0 for _, z, _ in items):
            return math.inf
        rdp = sum(n * self._curve(q, z) for q, z, n in items)
        with _quiet_absl():
            eps = float(rdp_privacy_accountant.compute_epsilon(self._orders, rdp, self.delta)[0])
        if self.mode == "local" and self.mechanism == "laplace":
            eps = min(eps, sum(n / z for _, z, n in items))
        return eps

    def charged(self, q: float, z: float) -> dict[tuple[float, float], int]:
        """The ledger with one more round of (q, z)."""
        out = dict(self.ledger)
        out[(float(q), float(z))] = out.get((float(q), float(z)), 0) + 1
        return out

    def charge(self, q: float, z: float) -> None:
        self.ledger = self.charged(q, z)

    def state_dict(self) -> list[list[float]]:
        return [[q, z, n] for (q, z), n in self.ledger.items()]

    def load_state_dict(self, state: Sequence[Sequence[float]]) -> None:
        self.ledger = {(float(q), float(z)): int(n) for q, z, n in state}


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                               rounds: int, mode: str, mechanism: str = "gaussian",
                               max_noise: float = MAX_NOISE_MULTIPLIER,
                               rtol: float = 1e-3) -> float:
    """The smallest noise multiplier z (within ``rtol``, rounded up) whose ε after ``rounds``
    rounds at ``sample_rate`` is at most ``target_epsilon``: a bracketing search on the accountant
    (ε falls as z grows) in log z, each step at the false-position point of log ε plus one probe
    ``rtol`` beyond it to close the bracket (one accountant call costs ~0.5 s at q < 1).
    The returned z always satisfies the target. PrivacyBudgetError when even ``max_noise`` does
    not meet it."""
    if rounds <= 0:
        return 0.0
    if not target_epsilon > 0:
        raise PrivacyBudgetError(f"target ε must be positive, got {target_epsilon}")
    acc = Accountant(mode, mechanism, delta)

    def gap(log_z: float) -> float:  # log ε(z) − log target: > 0 infeasible, <= 0 feasible
        e = acc.epsilon({(float(sample_rate), float(math.exp(log_z))): int(rounds)})
        return math.log(e) - math.log(target_epsilon) if e > 0 else -math.inf

    top = math.log(max_noise)
    hi = 0.0  # z = 1
    f_hi = gap(hi)
    lo, f_lo = hi, f_hi
    if f_hi > 0:  # bracket upwards: ε(lo) > target >= ε(hi)
        while f_hi > 0:
            if hi >= top:
                raise PrivacyBudgetError(
                    f"target ε={target_epsilon:g} at δ={delta:g} over {rounds} rounds (sample "
                    f"rate {sample_rate:.4g}) needs a noise multiplier above {max_noise:g}: the "
                    "run would learn nothing; raise dp-target-epsilon or dp-delta, or run fewer "
                    "rounds")
            lo, f_lo = hi, f_hi
            hi = min(hi + math.log(4.0), top)
            f_hi = gap(hi)
    else:  # bracket downwards
        while f_lo <= 0:
            hi, f_hi = lo, f_lo
            lo -= math.log(4.0)
            f_lo = gap(lo)
    tol = math.log1p(rtol)
    while hi - lo > tol:
        width = hi - lo
        c = 0.5 * (lo + hi)
        if math.isfinite(f_lo) and f_lo != f_hi:  # false position of log ε, kept inside
            c = hi - f_hi * width / (f_hi - f_lo)
            c = min(max(c, lo + 0.05 * width), hi - 0.05 * width)
        f_c = gap(c)
        if f_c > 0:
            lo, f_lo = c, f_c
            probe = c + tol  # the root is usually right next to the secant point: close it in
        else:
            hi, f_hi = c, f_c
            probe = c - tol
        if lo < probe < hi:
            f_p = gap(probe)
            if f_p > 0:
                lo, f_lo = probe, f_p
            else:
                hi, f_hi = probe, f_p
    return float(math.exp(hi))


# ============================================================================ client half


def sent_values(upload: Mapping[str, np.ndarray], pipe: Any) -> int:
    """How many values an upload puts on the wire through the chain ``pipe`` (a parsed
    ``Pipeline``): the ``topk`` density's share, else all."""
    n = int(sum(np.asarray(v).size for v in upload.values()))
    density = getattr(pipe.sparsifier, "density", 1.0)
    return int(density * n) if density < 1.0 else n


def privatize(res: Any, ins: Any, codec_up: Any = None,
              rng: np.random.Generator | None = None) -> Any:
    """A node's DP step on its :class:`~fedlora.strategies.client.ClientResult` before encoding;
    ``ins`` is the round's :class:`~fedlora.strategies.protocol.TrainInstruction` (its ``dp``
    None: ``res`` unchanged). Central: the upload clipped to the clip (L2), ``dp_clipped``
    reported. Local: clipped (L2 for Gaussian, L1 for Laplace), noise of scale z·2C added to
    every coordinate of every uploaded tensor (``rng``: default a fresh OS-entropy generator),
    ``num-examples`` 1 and only ``params_up`` reported (``codec_up``: the upload chain the node
    parsed). The upload must be the update (``upload`` = ``delta``)."""
    dp = ins.dp
    if dp is None:
        return res
    if dp.mode not in MODES:
        raise ValueError(f"train config 'dp' must be one of {MODES}, got {dp.mode!r}")
    if not ins.uploads_delta:
        raise ValueError("differential privacy clips the update: the server must ask for "
                         "upload='delta'")
    bound, mechanism, z = dp.clip, dp.mechanism, dp.noise_multiplier
    check_at_least("dp-clip", bound, strict=True)
    if not (math.isfinite(z) and z >= 0) or mechanism not in MECHANISMS:
        raise ValueError(f"bad DP train config: noise multiplier {z!r}, mechanism {mechanism!r}")
    order = 1 if mechanism == "laplace" else 2
    clipped, _, was_clipped = clip(res.upload, bound, order)
    if dp.mode == "central":
        return dataclasses.replace(res, upload=clipped, reply=dataclasses.replace(
            res.reply, dp_clipped=float(was_clipped)))
    rng = rng if rng is not None else np.random.default_rng()
    noisy = add_noise(clipped, local_noise_scale(bound, z), rng, mechanism)
    return dataclasses.replace(res, upload=noisy, reply=TrainReply(
        1, params_up=float(sent_values(noisy, codec_up))))


# ============================================================================ server half


@dataclass
class RoundDP:
    """What the privacy layer decided and measured for one round."""

    sample_rate: float
    sampled: int
    clip: float
    epsilon: float
    clipped: int = 0            # nodes that reported clipping (central; not a private statistic)
    server_clipped: int = 0     # updates the server had to clip again (codec error, or a liar)
    unclipped_fraction: float | None = None   # adaptive: the noisy b̃ that moved C
    stopped: str = ""


@dataclass
class ServerPrivacy:
    """The server's DP state: settings, current clip, accountant, noise generator. Inert when
    ``dp`` is off (every hook returns its input). ``state_dict``/``load_state_dict`` carry the
    clip, the accountant's rounds, the calibrated noise multiplier and the RNG state."""

    settings: DPSettings
    rounds_planned: int = 0
    seed: Any = None                     # tests only; None: OS entropy
    clip_norm: float = 0.0
    noise_multiplier: float | None = None  # z of the accountant (calibrated or the setting)
    stopped: str = ""
    rounds: dict[int, RoundDP] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        self.clip_norm = self.clip_norm or s.clip
        self.accountant = Accountant(s.mode, s.mechanism, s.delta)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_strategy(cls, strategy: Any, seed: Any = None) -> "ServerPrivacy":
        """Validate the ``dp-*`` keys against the strategy (a ValueError at start otherwise):
        DP needs updates (FLASC, LoRA-A2, or a weight-averaging method with ``upload=delta``),
        plain ``mean`` aggregation, and — central DP — no data-dependent norm bound of the guard
        (the DP clip bounds every update)."""
        cfg = strategy.cfg
        s = DPSettings.from_config(cfg)
        if s.enabled:
            if not strategy.replies_are_deltas:
                if getattr(strategy, "uploads", None) == "either":  # Uploads.EITHER
                    raise ValueError(f"dp={s.mode!r} clips and noises the update: {strategy.name} "
                                     "must send it, set upload='delta'")
                raise ValueError(f"dp={s.mode!r} needs a method whose server step adds up "
                                 "updates: fedavg, flocora, fl-lora, ffa-lora (upload='delta'), "
                                 f"flasc or lora-a2, not {strategy.name}")
            if str(cfg.aggregation) != "mean":
                raise ValueError(f"dp={s.mode!r} needs aggregation='mean' (the noisy sum's "
                                 "sensitivity is that of a sum of clipped updates)")
            if s.mode == "central" and (float(cfg.update_norm_bound) > 0
                                        or float(cfg.norm_bound_factor) > 0):
                raise ValueError("dp='central' clips every update to dp-clip; set "
                                 "norm-bound-factor=0 and update-norm-bound=0 (the automatic "
                                 "bound depends on the other clients' norms, which breaks the "
                                 "sum's sensitivity bound, and FLASC would reject noisy rounds)")
        return cls(s, rounds_planned=int(cfg.num_server_rounds), seed=seed)

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    @property
    def central(self) -> bool:
        return self.settings.mode == "central"

    def count_stddev(self, sampled: int) -> float:
        """σ_b of the clipped count: ``dp-count-stddev``, else sampled/20 (0 without noise, as
        Flower)."""
        if self.settings.count_stddev > 0:
            return self.settings.count_stddev
        return sampled / 20.0 if self.noise_multiplier else 0.0

    def update_noise(self, sampled: int) -> float:
        """z_Δ of the update sum (the whole z without adaptive clipping)."""
        z = float(self.noise_multiplier or 0.0)
        if not self.settings.adaptive:
            return z
        return update_noise_multiplier(z, self.count_stddev(sampled))

    # ------------------------------------------------------------------ before a round
    def round_config(self, server_round: int, sampled: int, available: int
                     ) -> tuple[bool, DPInstruction | None]:
        """Charge the round to the accountant: whether to send it, and the round's DP
        instruction to the nodes (None when DP is off); ``(False, None)`` once the round would
        exceed ``dp-target-epsilon``. On the first round, calibrate z for the target over the
        planned rounds at this sample rate (PrivacyBudgetError when it cannot be met: the run
        refuses to start)."""
        if not self.enabled or sampled <= 0:
            return True, None
        if self.stopped:
            return self._stop(server_round, 0.0, 0, self.stopped)
        s = self.settings
        q = 1.0 if s.mode == "local" else min(1.0, sampled / max(available, 1))
        first = self.noise_multiplier is None
        if first:
            self.noise_multiplier = s.noise_multiplier
            if s.target_epsilon > 0:
                left = max(self.rounds_planned - server_round + 1, 1)
                self.noise_multiplier = calibrate_noise_multiplier(
                    s.target_epsilon, s.delta, q, left, s.mode, s.mechanism)
                log.info("dp: noise multiplier %.4f meets ε=%g at δ=%g over %d rounds (q=%.4g)",
                         self.noise_multiplier, s.target_epsilon, s.delta, left, q)
        try:
            self.update_noise(sampled)  # adaptive clipping: the split must be possible
        except PrivacyBudgetError as err:
            if first:
                self.noise_multiplier = None
                raise
            return self._stop(server_round, q, sampled, f"round {server_round}: {err}")
        z = float(self.noise_multiplier)
        eps = self.accountant.epsilon(self.accountant.charged(q, z))
        if s.target_epsilon > 0 and eps > s.target_epsilon * (1 + BUDGET_RTOL):
            return self._stop(server_round, q, sampled,
                              f"round {server_round} would take ε to {eps:.4g} > "
                              f"dp-target-epsilon {s.target_epsilon:g}")
        self.accountant.charge(q, z)
        self.rounds[server_round] = RoundDP(q, sampled, self.clip_norm, eps)
        return True, DPInstruction(s.mode, s.mechanism, float(self.clip_norm), z)

    def _stop(self, server_round: int, q: float, sampled: int, reason: str
              ) -> tuple[bool, None]:
        """Send no more rounds (this one included); the reason goes to the records."""
        if not self.stopped:
            log.warning("dp: %s; no more rounds are sent", reason)
        self.stopped = self.stopped or reason
        self.rounds[server_round] = RoundDP(q, sampled, self.clip_norm, self.epsilon,
                                            stopped=self.stopped)
        return False, None

    @property
    def epsilon(self) -> float:
        """ε at ``dp-delta`` of the rounds charged so far."""
        return self.accountant.epsilon()

    # ------------------------------------------------------------------ after a round
    def server_step(self, server_round: int, updates: list) -> list:
        """Central DP on the decoded, validated replies (ClientUpdates holding updates): clip each
        to the round's C, sum, add N(0, (z_Δ·C)²) per coordinate, divide by the number of nodes
        sampled; one pseudo-reply (num-examples 1) that the method applies as its mean update.
        Adaptive clipping then sets next round's C. Other modes: ``updates`` unchanged."""
        if not (self.enabled and self.central) or not updates:
            return updates
        rd = self.rounds.get(server_round)
        if rd is None:  # not configured through round_config (should not happen)
            rd = self.rounds[server_round] = RoundDP(1.0, len(updates), self.clip_norm,
                                                     self.epsilon)
        bound, m = rd.clip, max(rd.sampled, 1)
        total = OrderedDict((k, np.zeros(v.shape, np.float64)) for k, v in updates[0].tensors.items())
        flags = []
        for u in updates:
            clipped, _, again = clip(u.tensors, bound)
            rd.server_clipped += int(again)
            flags.append(bool((u.reply.dp_clipped or 0.0) > 0.5) or again)
            for k in total:
                total[k] += clipped[k]
        rd.clipped = sum(flags)
        std = self.update_noise(m) * bound
        noisy = add_noise(total, std, self.rng)
        mean = OrderedDict((k, (v.astype(np.float64) / m).astype(np.float32))
                           for k, v in noisy.items())
        if self.settings.adaptive:
            b = noisy_unclipped_fraction(flags, m, self.count_stddev(m), self.rng)
            rd.unclipped_fraction = b
            self.clip_norm = adaptive_clip(self.clip_norm, b, self.settings.target_quantile,
                                           self.settings.clip_lr)
        return [dataclasses.replace(updates[0], node_id=-1, tensors=mean, num_examples=1,
                                    metrics={}, config={}, weight=1, reply=None)]

    # ------------------------------------------------------------------ records
    def record(self, server_round: int) -> dict[str, Any]:
        """The ``dp_*`` keys of a round record ({} when DP is off)."""
        if not self.enabled:
            return {}
        rd = self.rounds.get(server_round)
        out = {"dp": self.settings.mode, "dp_delta": self.settings.delta,
               "dp_noise_multiplier": self.noise_multiplier,
               "dp_epsilon": rd.epsilon if rd is not None else self.epsilon,
               "dp_stopped": bool(rd.stopped) if rd is not None else bool(self.stopped)}
        if rd is not None:
            out.update({"dp_clip": rd.clip, "dp_sample_rate": rd.sample_rate,
                        "dp_denominator": rd.sampled, "dp_clipped": rd.clipped,
                        "dp_server_clipped": rd.server_clipped,
                        "dp_unclipped_fraction": rd.unclipped_fraction,
                        "dp_stop_reason": rd.stopped})
        return out

    def summary(self) -> dict[str, Any]:
        """Run summary entries: the final ε at δ and what produced it ({} when off)."""
        if not self.enabled:
            return {}
        s = self.settings
        return {"dp": s.mode, "dp_mechanism": s.mechanism, "dp_epsilon": self.epsilon,
                "dp_delta": s.delta, "dp_noise_multiplier": self.noise_multiplier,
                "dp_target_epsilon": s.target_epsilon or None,
                "dp_rounds_charged": sum(self.accountant.ledger.values()),
                "dp_clip": self.clip_norm, "dp_stopped": self.stopped or None}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain values: clip, noise multiplier, accountant ledger, stop reason, RNG state."""
        return {"clip": self.clip_norm, "noise_multiplier": self.noise_multiplier,
                "ledger": self.accountant.state_dict(), "stopped": self.stopped,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clip_norm = float(state["clip"])
        nm = state.get("noise_multiplier")
        self.noise_multiplier = None if nm is None else float(nm)
        self.accountant.load_state_dict(state.get("ledger", []))
        self.stopped = str(state.get("stopped", ""))
        self.rng.bit_generator.state = state["rng"]
