"""User-level differential privacy: per-user clipping, seeded Gaussian noise, and the accountant.

Mechanism (central DP, the Gaussian mechanism on sums). In every exchange that a user's data
enters, the device scales that user's whole upload to L2 norm at most ``clip`` (pretraining: its
``E0`` row gradients and contribution changes; PEE learning: its row gradients and its
block-weight gradient, each as one vector); the server adds Gaussian noise of standard
deviation ``noise_multiplier * clip`` to every coordinate of the summed upload, on every row of
the table (noise on the touched rows only would reveal which rows were touched), and divides the
gradients by the *expected* number of users in the round, never by data-dependent counts. Under
noise, PEE devices keep their per-item-group loss statistics (controller features) at home.

Accounting. Adding or removing one user changes exactly one aggregate per release: each ``init``
exchange of pretraining (every user takes part), and one round of each pass of pretraining and
of PEE learning (a user's round comes from a hash of the seed and its own id, so it does not
depend on the other users; a user is in one user group). We claim no amplification by sampling:
the DP event is ``SelfComposedDpEvent(GaussianDpEvent(sigma), releases)``, and epsilon comes from
the privacy-loss-distribution accountant of Google's ``dp-accounting`` package. Not covered
(``NOT_COVERED``, named in every report): the statistics, the grouping, the bit-plane orders and
the evaluation, whose sums are released exactly.

Distributed DP (``secure-rows`` with DP noise): the same releases, but the server never holds an
un-noised sum. Every node of a secure sum adds its share of the noise, Gaussian of standard
deviation ``noise_std / sqrt(shares)``, to the values it masks, where ``shares`` is the fewest
nodes whose uploads may enter the sum (the whole cohort with pairwise masks, the threshold ``t``
with Shamir shares); the server unmasks only when at least that many uploads arrived, so the
sum it sees carries noise of at least ``noise_std``, as in central DP. A node that hosts no user
of a released part adds its share there too. The shares are continuous Gaussians rounded to the
fixed-point grid of secure aggregation (2**-24 per value): the accountant ignores that rounding,
which the distributed discrete Gaussian of Kairouz et al. (ICML 2021) would make exact.

Flower's DP helpers (``flwr.supercore.differential_privacy``) clip a node's whole update and draw
noise from numpy's global generator. Here a node hosts many users, each clipped alone, and every
run must repeat with its seed, so the two operations live here; the arithmetic is the same.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

ACCOUNTANT = "PLD (dp-accounting)"
# beyond this the noise (1e4 times the clip per coordinate) leaves no signal to learn from
MAX_NOISE_MULTIPLIER = 1e4
# T Gaussian releases of multiplier s are one of s / sqrt(T); below this the PLD accountant's
# grid outgrows memory (epsilon about 280 at delta 1e-5)
MIN_EFFECTIVE_NOISE = 0.05


class PrivacyError(ValueError):
    """Out-of-range DP parameters or an unreachable target epsilon."""


@dataclass(frozen=True)
class DPConfig:
    """User-level DP settings: clip bound, noise multiplier (sigma) and delta.

    ``noise_multiplier`` 0 with a finite clip clips without noise (epsilon is infinite).
    """

    clip: float
    noise_multiplier: float
    delta: float

    def __post_init__(self) -> None:
        if not np.isfinite(self.clip) or self.clip <= 0:
            raise PrivacyError(f"dp-clip must be a positive number, got {self.clip}")
        if not np.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
            raise PrivacyError(f"dp-noise-multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"dp-delta must be in (0, 1), got {self.delta}")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of a sum."""
        return self.noise_multiplier * self.clip


def noised(dp: DPConfig | None) -> bool:
    """Whether ``dp`` adds noise (without it, DP only clips: epsilon is infinite, the plain
    aggregation stays, and devices may send their loss statistics)."""
    return dp is not None and dp.noise_std > 0


def dp_event(noise_multiplier: float, releases: int):
    """The ``dp_accounting`` event of ``releases`` Gaussian releases with sensitivity 1 each."""
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(noise_multiplier), int(releases)
    )


def epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``releases`` Gaussian releases (inf without noise, 0 without
    releases)."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    if noise_multiplier / np.sqrt(releases) < MIN_EFFECTIVE_NOISE:
        raise PrivacyError(
            f"dp-noise-multiplier {noise_multiplier:g} over {releases} releases is too small to "
            f"account (epsilon in the hundreds): use at least "
            f"{MIN_EFFECTIVE_NOISE * np.sqrt(releases):.3g}, or 0 to clip only"
        )
    from dp_accounting.pld import PLDAccountant

    # a grid of 1e-3 in privacy loss: pessimistic, so still an upper bound, within 1e-5 of the
    # default 1e-4 grid on our settings and ten times faster (the noise search calls it often)
    acc = PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_event(noise_multiplier, releases))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def noise_for_epsilon(target_epsilon: float, releases: int, delta: float) -> float:
    """The smallest noise multiplier whose ``releases`` Gaussian releases stay within
    ``target_epsilon`` at ``delta`` (bisection on the accountant, relative precision 1e-3)."""
    if not np.isfinite(target_epsilon) or target_epsilon <= 0:
        raise PrivacyError(f"dp-target-epsilon must be a positive number, got {target_epsilon}")
    if not 0 < delta < 1:
        raise PrivacyError(f"dp-delta must be in (0, 1), got {delta}")
    if releases <= 0:
        raise PrivacyError("dp-target-epsilon needs at least one release to noise")
    lo = MIN_EFFECTIVE_NOISE * np.sqrt(releases)
    hi = 2 * lo
    while epsilon(hi, releases, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"dp-target-epsilon {target_epsilon} is unreachable with a noise multiplier up "
                f"to {MAX_NOISE_MULTIPLIER:g} over {releases} releases"
            )
    if epsilon(lo, releases, delta) <= target_epsilon:
        raise PrivacyError(
            f"dp-target-epsilon {target_epsilon} needs a noise multiplier below {lo:.3g}: "
            "set dp-noise-multiplier instead"
        )
    while hi / lo > 1 + 1e-3:  # epsilon(lo) > target >= epsilon(hi)
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if epsilon(mid, releases, delta) <= target_epsilon else (mid, hi)
    return float(hi)


def clip_factors(sq_norms: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-user scale ``min(1, clip / norm)`` from each user's squared L2 norm."""
    norms = sq_norms.clamp_min(0).sqrt()
    return torch.clamp(clip / norms.clamp_min(1e-30), max=1.0)


def gaussian_noise(shape: tuple[int, ...], std: float, rng: np.random.Generator) -> torch.Tensor:
    """Seeded Gaussian noise (float32) of standard deviation ``std``."""
    if std == 0:
        return torch.zeros(shape)
    return torch.from_numpy(rng.normal(0.0, std, size=shape).astype(np.float32))


def noise_share_std(dp: DPConfig, shares: int) -> float:
    """Distributed DP: the standard deviation of one node's share of the noise, such that any
    ``shares`` or more shares add up to at least ``dp.noise_std``."""
    if shares < 1:
        raise ValueError(f"distributed DP needs at least one noise share, got {shares}")
    return dp.noise_std / float(np.sqrt(shares))


def add_noise_share(
    vector: np.ndarray, released: list[slice], std: float, rng: np.random.Generator
) -> np.ndarray:
    """Distributed DP, on a device: ``vector`` with Gaussian noise of ``std`` on the positions
    ``released`` (the parts of the upload that the server releases; the rest, such as user
    counts, goes up as it is). Returns a new float64 array."""
    out = np.array(vector, dtype=np.float64)
    for part in released:
        out[part] += rng.normal(0.0, std, size=out[part].shape)
    return out


# where a device's noise share comes from: "seed" (the run's seed, the node's partition and the
# exchange: a study repeats with its seed, but a server that knows the seed could regenerate the
# shares) or "device" (the operating system's entropy: what a deployment needs)
NOISE_SOURCES = ("seed", "device")
DDP_STREAM = 9_100_001


def noise_share_rng(
    source: str, seed: int, partition: int, exchange: tuple[int, ...]
) -> np.random.Generator:
    """The generator of one node's noise share in one exchange (``exchange``: phase and step
    numbers): seeded, or fresh from the operating system (``source``, one of ``NOISE_SOURCES``)."""
    if source == "device":
        return np.random.default_rng()
    if source != "seed":
        raise ValueError(
            f"dp-noise-source must be one of {', '.join(NOISE_SOURCES)}, got {source!r}"
        )
    return np.random.default_rng([seed, DDP_STREAM, partition, *exchange])


# the releases that no epsilon here covers: said in every report, so no one reads a total into it
NOT_COVERED = (
    "statistics: item degrees, user and interaction counts (secure sums, released exactly)",
    "grouping: k-means centroid sums and counts",
    "bit-plane orders: second moments and item counts per user group",
    "participation: how many users took part in each round (in PEE learning also how many of "
    "them validated), per user group",
    "evaluation: metric sums",
)


def local_epsilon(noise: float, releases: int, delta: float) -> float:
    """Epsilon at ``delta`` of local DP: ``releases`` uploads of one user, each clipped to L2
    norm ``clip`` and sent with Gaussian noise of ``noise * clip`` on every value. The server
    sees each upload; two uploads of the same user differ by up to ``2 * clip``, so each is a
    Gaussian release of noise multiplier ``noise / 2``, composed without any sampling gain."""
    return epsilon(noise / 2, releases, delta)


def local_privacy_report(noise: float, releases: dict[str, int], delta: float) -> dict:
    """The local-DP part of a run's report: one user's uploads per phase (``releases``, keyed
    by phase as ``FedConfig.dp_releases``), epsilon per phase and over all of them."""

    def eps(n: int) -> float | str:
        value = local_epsilon(noise, n, delta)
        return round(value, 4) if np.isfinite(value) else "inf"

    total = int(sum(releases.values()))
    return {
        "mechanism": "local DP of pretraining and PEE learning uploads: each user clips its "
        "upload and adds Gaussian noise on its device (the server sees noised uploads; which "
        "rows a user touched is not hidden, see decoy-items)",
        "accountant": ACCOUNTANT,
        "noise_multiplier_per_value": noise,
        "sensitivity": "2 x dp-clip (one user's two possible uploads)",
        "releases": {phase: int(n) for phase, n in releases.items()},
        "delta": delta,
        "epsilon": {**{phase: eps(n) for phase, n in releases.items()}, "covered": eps(total)},
    }


CENTRAL = (
    "user-level central DP: each user's upload clipped on its device, Gaussian noise on every "
    "released sum by the server"
)
DISTRIBUTED = (
    "user-level distributed DP: each user's upload clipped on its device, and every node adds "
    "its share of the Gaussian noise before secure aggregation, so the server sees only noised "
    "sums (shares of noise_std / sqrt(t), t the fewest uploads a sum is unmasked with)"
)


SEEDED_SHARES = (
    "the noise shares are drawn from the run's seed (dp-noise-source=seed: a study repeats), "
    "which the server knows, so against the server itself this holds only with "
    "dp-noise-source=device"
)


def privacy_report(
    dp: DPConfig,
    releases: dict[str, int],
    distributed: bool = False,
    noise_source: str = "seed",
) -> dict:
    """The privacy section of a run's report: settings, the DP event, epsilon per phase (keyed
    like ``releases``) and over all of them, and what is not covered. An infinite epsilon (no
    noise) is written as the string ``"inf"``. ``distributed``: the noise is added by the nodes
    under secure aggregation (the releases and epsilon are the same), drawn from
    ``noise_source``."""

    def eps(n: int) -> float | str:
        value = epsilon(dp.noise_multiplier, n, dp.delta)
        return round(value, 4) if np.isfinite(value) else "inf"

    total = int(sum(releases.values()))
    return {
        "mechanism": (
            (DISTRIBUTED + ("; " + SEEDED_SHARES if noise_source == "seed" else ""))
            if distributed
            else CENTRAL
        ),
        **({"noise_source": noise_source} if distributed else {}),
        "accountant": ACCOUNTANT,
        "dp_event": repr(dp_event(dp.noise_multiplier, total)),
        "clip": dp.clip,
        "noise_multiplier": round(dp.noise_multiplier, 6),
        "delta": dp.delta,
        "releases": dict(releases),
        "epsilon": {**{phase: eps(n) for phase, n in releases.items()}, "covered": eps(total)},
        "not_covered": list(NOT_COVERED),
    }
