"""Synthetic lifelong behavior sequences with long-range signal and known ground truth.

The world:

* ``num_items`` items (2,000) in ``num_categories`` categories (100; item ``i`` is in category
  ``i // items_per_category``), each category split into ``subclusters`` (10) groups of
  neighbouring ids. Every item has a latent vector ``center[c] + sub[c, s] + 0.3 * noise``
  (unit-normalised), so items of one subcluster are close (cos ~ 0.95), of one category related
  (cos ~ 0.5).
* Every user has ``long_term_interests`` (4) (category, subcluster) pairs, fixed for life, and
  ``short_term_interests`` (3) categories that change every week. Both are pure functions of the
  seed, the user and the week (an integer hash), so any sample can be generated alone.
* A history is lognormal-long (median ``max_seq_len / 4``, clipped to ``[min_seq_len,
  max_seq_len]``). Behaviors older than the ``recent_window`` (50) come from the long-term
  interests with probability ``long_term_share`` (5%; 70% of those in the interest's
  subcluster) and are random otherwise; the recent window comes from the short-term interests
  with probability ``short_term_share`` (60%). So the long-term interests appear sparsely all
  along the history and hardly ever in the last 50.
* Every request shows ``candidates_per_request`` (4) candidates (the impressions that GAUC
  groups): half from a long-term interest (half of those in its subcluster), 30% from a
  short-term one, the rest random.
* The label is Bernoulli(sigmoid(logit)) with ``logit = 2.5 log(1 + E) + short_match - 3``,
  where the evidence ``E = sum_j (0.3 + 0.7 relu(cos(target, j))^2) (0.5 + 0.5 exp(-age_j /
  180 days))`` runs over the behaviors older than the recent window with the candidate's
  category, and ``short_match = 1`` when the candidate's category appears in the recent window.
  The label thus depends mostly on evidence older than the last ``recent_window`` behaviors
  (measured on the test split, 15,360 samples: ranking by ``E`` alone gives AUC 0.863, by
  ``short_match`` alone 0.518, by the true logit 0.873, the best any model can do).
* Ground truth: ``relevant[j]`` marks the older behaviors with the candidate's category and
  ``cos > 0.7`` (the candidate's own subcluster), the ones that carry most of ``E``.

That is the default ``regime="category"``. ``regime="similarity"`` keeps the requests,
timestamps, splits and the label's form, and changes what relevance is, so that neither the
category, nor the recent window, nor the history's length, nor the user says which candidate is
clicked:

* Categories are coarse (``num_categories`` 10 by default) and nearly uninformative: an item's
  latent is ``topic[t(i)] + 0.3 category[c(i)] + 0.4 noise`` (normalised, ``similarity_latents``)
  with ``num_topics`` (200) topics assigned by a seeded permutation of the ids, independent of
  the category; same-category items have mean cos ~0.07, any two ~0. Similarity is item-level:
  the ``neighbours`` (20) nearest items of an item have cos ~0.93 (1st) to ~0.78 (19th).
* Every history is ``max_seq_len`` long (``min_seq_len`` defaults to it), so its length says
  nothing. Interests are anchor items (4 long-term, fixed for life; 3 short-term, weekly). About
  ``interest_behaviors`` (24) of the behaviors older than the recent window are one of a
  long-term anchor's ``neighbours`` nearest items (a count, not a share of the history); the
  recent window comes from the short-term anchors (60%); everything else is uniform over the
  catalogue. A candidate is one of a long-term anchor's neighbours (50%) or uniform.
* ``logit = 4 (log(1 + E) - log(1 + E_u)) - 1`` with ``E = sum_j w(cos(target, j)) (0.5 + 0.5
  exp(-age_j / 180 days))`` over the behaviors older than the recent window, ``w(c) = relu((c -
  0.6) / 0.4)^2``, whatever their category: the evidence is how many old behaviors lie near the
  candidate, the interest-driven ones and the uniform ones that fall near it alike. ``E_u`` is
  what a history of uniform items at the same ages would give this candidate (``prior[i]``, the
  item's mean ``w`` against every item, times the summed decays), so an item that is near many
  others is not clicked more for that: the candidate alone says nothing. Ground truth:
  ``relevant[j]`` = older than the window and ``cos > 0.8``.
* Measured on 5,120 test samples at ``max_seq_len = 1000``: click rate 0.35; the true logit
  reaches AUC 0.734 and GAUC 0.736; the same rule read from the last 50 behaviors only, AUC
  0.498; the cosine of the history's mean latent with the candidate's, 0.506; the candidate's
  prior, 0.497; the history's length, 0.5; 9.2 relevant behaviors per sample.

``SyntheticGenerator.batch_with_oracle`` (and ``oracle``) return the true logit of every sample,
the oracle a model's AUC and GAUC are compared with.

Timestamps are integer seconds; a history spans 0.5 to 3 years before its request, every behavior
strictly before the request (point-in-time correct). Splits are by request time: train requests
in days ``[0, 80)``, validation ``[80, 90)``, test ``[90, 100)`` of the request period.

Generation is vectorised numpy per batch (no Python loop over samples or behaviors), deterministic
in ``(seed, split, batch index)``, so any worker count, rank count or resume point sees the same
batches.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec import KeyedJaggedTensor

from torchrec_longseq.data.batch import FEATURE_KEYS, Batch

DAY = 86_400
YEAR = 365 * DAY
SPLITS: Dict[str, tuple] = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}
REGIMES = ("category", "similarity")
_REQUEST_EPOCH = 4 * YEAR  # request period starts here, so every timestamp is positive


@dataclass
class SyntheticConfig:
    """Sizes and knobs of the synthetic world (defaults are the README's "default data").

    ``regime`` picks the label's rule (see the module's docstring): ``"category"`` (the default)
    or ``"similarity"``, whose own knobs are ``num_topics``, ``neighbours`` and
    ``interest_behaviors``, whose categories are coarse (``num_categories`` defaults to 10
    there, 100 otherwise) and whose histories are all ``max_seq_len`` long (``min_seq_len``
    defaults to it there, to 10 otherwise); ``subclusters``, ``long_term_share`` and
    ``recent_window``'s role in the category rule do not apply to it.
    """

    seed: int = 0
    max_seq_len: int = 2000
    min_seq_len: Optional[int] = None  # None: 10 (category regime), max_seq_len (similarity)
    num_users: int = 100_000
    num_items: int = 2_000
    num_categories: Optional[int] = None  # None: 100 (category regime), 10 (similarity regime)
    subclusters: int = 10
    latent_dim: int = 8
    recent_window: int = 50
    long_term_interests: int = 4
    short_term_interests: int = 3
    long_term_share: float = 0.05
    short_term_share: float = 0.6
    candidates_per_request: int = 4
    regime: str = "category"
    num_topics: int = 200
    neighbours: int = 20
    interest_behaviors: int = 24
    table_sizes: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {self.regime!r}")
        if self.num_categories is None:  # coarse categories in the similarity regime
            self.num_categories = 100 if self.regime == "category" else 10
        if self.min_seq_len is None:  # every history max_seq_len long in the similarity regime
            self.min_seq_len = 10 if self.regime == "category" else self.max_seq_len
        if self.regime == "category" and self.num_items % (self.num_categories * self.subclusters):
            raise ValueError("num_items must be a multiple of num_categories * subclusters")
        if self.regime == "similarity":
            if self.num_items % self.num_categories:
                raise ValueError("num_items must be a multiple of num_categories")
            if self.interest_behaviors < 0:
                raise ValueError(f"need interest_behaviors >= 0, got {self.interest_behaviors}")
            if not 1 <= self.neighbours <= self.num_items or self.num_topics < 1:
                raise ValueError(f"need 1 <= neighbours <= num_items and num_topics >= 1, got "
                                 f"{self.neighbours}, {self.num_topics}")
        if not 0 <= self.min_seq_len <= self.max_seq_len:
            raise ValueError(f"need 0 <= min_seq_len <= max_seq_len, got {self.min_seq_len}, "
                             f"{self.max_seq_len}")
        self.table_sizes = {
            "user_id": self.num_users,
            "context_hour": 24,
            "target_item": self.num_items,
            "target_category": self.num_categories,
            "hist_item": self.num_items,
            "hist_category": self.num_categories,
        }

    @property
    def items_per_category(self) -> int:
        return self.num_items // self.num_categories


def _hash(*keys: np.ndarray) -> np.ndarray:
    """splitmix64 of the combined keys: a vectorised, seedable integer hash (uint64)."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for k in keys:
            h = (h ^ np.asarray(k).astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
            h = h ^ (h >> np.uint64(31))
            h = h * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(29))
    return h


def item_latents(config: SyntheticConfig) -> np.ndarray:
    """``[num_items, latent_dim]`` unit latent vectors: clustered by category and subcluster
    (category regime), or by topic with a small category part (similarity regime, see
    ``similarity_latents``)."""
    if config.regime == "similarity":
        return similarity_latents(config)
    rng = np.random.default_rng([config.seed, 7])
    c, s, d = config.num_categories, config.subclusters, config.latent_dim
    center = rng.standard_normal((c, 1, 1, d))
    sub = rng.standard_normal((c, s, 1, d))
    noise = 0.3 * rng.standard_normal((c, s, config.num_items // (c * s), d))
    latent = (center + sub + noise).reshape(config.num_items, d)
    return (latent / np.linalg.norm(latent, axis=1, keepdims=True)).astype(np.float32)


def similarity_latents(config: SyntheticConfig) -> np.ndarray:
    """The similarity regime's ``[num_items, latent_dim]`` unit latents: ``topic[t(i)] + 0.3
    category[c(i)] + 0.4 noise_i``, all parts N(0, I), normalised. The topic ``t(i)`` of an item
    is a seeded permutation of the ids (``perm[i] % num_topics``), so it is independent of the
    category ``c(i) = i // items_per_category``; the category part makes two items of one
    category only slightly closer (mean cos ~0.1 against ~0 for any two items), so the
    categories are coarse and nearly uninformative. Topics (10 items each by default) overlap
    in the 8 dimensions: similarity is a continuum, not a partition."""
    rng = np.random.default_rng([config.seed, 11])
    n, d = config.num_items, config.latent_dim
    topic_center = rng.standard_normal((config.num_topics, d))
    category_center = rng.standard_normal((config.num_categories, d))
    noise = rng.standard_normal((n, d))
    topic = rng.permutation(n) % config.num_topics
    category = np.arange(n) // config.items_per_category
    latent = topic_center[topic] + 0.3 * category_center[category] + 0.4 * noise
    return (latent / np.linalg.norm(latent, axis=1, keepdims=True)).astype(np.float32)


def nearest_items(latents: np.ndarray, count: int) -> np.ndarray:
    """``[num_items, count]`` each item's ``count`` most similar items by cosine (itself first),
    the similarity regime's neighbourhoods (ties to the lower id)."""
    cos = latents.astype(np.float64) @ latents.astype(np.float64).T
    order = np.argsort(-cos, axis=1, kind="stable")
    return order[:, :count]


# similarity regime: the label's similarity kernel and the ground truth's threshold
SIM_FLOOR = 0.6  # w(cos) = relu((cos - SIM_FLOOR) / (1 - SIM_FLOOR))^2
SIM_RELEVANT = 0.8  # relevant: old and cos > 0.8
SIM_BIAS = 1.0  # logit = 2.5 (log(1 + E) - log(1 + E_uniform)) - SIM_BIAS


def similarity_weight(cos: np.ndarray) -> np.ndarray:
    """The similarity regime's per-behavior weight ``relu((cos - 0.6) / 0.4)^2`` in [0, 1]."""
    return np.maximum((cos - SIM_FLOOR) / (1 - SIM_FLOOR), 0) ** 2


class SyntheticGenerator:
    """Makes batches of the synthetic world; ``batch(split, index, batch_size)`` is pure.

    ``batch_with_oracle`` also returns the generator's true logit per sample (the oracle: the
    best any model can predict), from which the labels were drawn."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.latents = item_latents(config)
        self.neighbours = (nearest_items(self.latents, config.neighbours)
                           if config.regime == "similarity" else None)
        # similarity regime: each item's mean weight w(cos) against a uniform item
        self.prior = (similarity_weight(self.latents.astype(np.float64)
                                        @ self.latents.astype(np.float64).T).mean(axis=1)
                      if config.regime == "similarity" else None)

    def _items(self, rng: np.random.Generator, category: np.ndarray, sub: np.ndarray) -> np.ndarray:
        cfg = self.config
        per_sub = cfg.items_per_category // cfg.subclusters
        return category * cfg.items_per_category + sub * per_sub + rng.integers(
            per_sub, size=category.shape
        )

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        """Batch ``index`` of ``split`` (``batch_size`` must be a multiple of the candidates per
        request)."""
        return self.batch_with_oracle(split, index, batch_size)[0]

    def oracle(self, split: str, index: int, batch_size: int) -> torch.Tensor:
        """``[batch_size]`` float64: the true logit of each sample of ``batch(split, index,
        batch_size)`` (its label is Bernoulli(sigmoid(logit)))."""
        return self.batch_with_oracle(split, index, batch_size)[1]

    def batch_with_oracle(self, split: str, index: int, batch_size: int
                          ) -> Tuple[Batch, torch.Tensor]:
        """``(batch, logits [batch_size] float64)``: the batch and its true logits."""
        cfg = self.config
        g = cfg.candidates_per_request
        if batch_size % g:
            raise ValueError(f"batch_size {batch_size} is not a multiple of candidates_per_request {g}")
        split_id = list(SPLITS).index(split)
        rng = np.random.default_rng([cfg.seed, split_id, index])
        r = batch_size // g
        first_day, last_day = SPLITS[split]

        # requests: user, time, the user's interests
        user = rng.integers(cfg.num_users, size=r)
        request_time = (_REQUEST_EPOCH + first_day * DAY
                        + rng.integers((last_day - first_day) * DAY, size=r))
        week = request_time // (7 * DAY)
        j_long = np.arange(cfg.long_term_interests)
        long_cat = (_hash(cfg.seed, user[:, None], j_long, 1) % cfg.num_categories).astype(np.int64)
        long_sub = (_hash(cfg.seed, user[:, None], j_long, 2) % cfg.subclusters).astype(np.int64)
        j_short = np.arange(cfg.short_term_interests)
        short_cat = (_hash(cfg.seed, user[:, None], week[:, None], j_short, 3)
                     % cfg.num_categories).astype(np.int64)

        # history lengths (lognormal, long-tailed) and positions
        median = max(cfg.max_seq_len / 4, cfg.min_seq_len, 1e-3)  # > 0 for max_seq_len = 0
        lengths = np.clip(np.exp(rng.normal(math.log(median), 1.0, size=r)),
                          cfg.min_seq_len, cfg.max_seq_len).astype(np.int64)
        n = int(lengths.sum())
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        seg = np.repeat(np.arange(r), lengths)
        from_end = offsets[1:][seg] - 1 - np.arange(n)
        recent = from_end < cfg.recent_window

        if cfg.regime == "similarity":
            return self._similarity_batch(rng, split, batch_size, user, request_time, week,
                                          lengths, offsets, seg, recent)

        # behaviors: interest-driven or random
        u = rng.random(n)
        category = rng.integers(cfg.num_categories, size=n)
        sub = rng.integers(cfg.subclusters, size=n)
        is_long = ~recent & (u < cfg.long_term_share)
        pick = rng.integers(cfg.long_term_interests, size=n)
        category = np.where(is_long, long_cat[seg, pick], category)
        sub = np.where(is_long & (rng.random(n) < 0.7), long_sub[seg, pick], sub)
        is_short = recent & (u < cfg.short_term_share)
        category = np.where(is_short, short_cat[seg, rng.integers(cfg.short_term_interests, size=n)],
                            category)
        item = self._items(rng, category, sub)

        age, htime = _timestamps(rng, request_time, offsets, seg)

        # candidates: g per request
        b = batch_size
        req = np.repeat(np.arange(r), g)
        kind = rng.random(b)
        pick = rng.integers(cfg.long_term_interests, size=b)
        t_cat = rng.integers(cfg.num_categories, size=b)
        t_sub = rng.integers(cfg.subclusters, size=b)
        from_long = kind < 0.5
        t_cat = np.where(from_long, long_cat[req, pick], t_cat)
        t_sub = np.where(from_long & (rng.random(b) < 0.5), long_sub[req, pick], t_sub)
        from_short = (kind >= 0.5) & (kind < 0.8)
        t_cat = np.where(from_short, short_cat[req, rng.integers(cfg.short_term_interests, size=b)],
                         t_cat)
        t_item = self._items(rng, t_cat, t_sub)

        s_lengths, s_seg, (h_item, h_cat, h_time, h_recent, h_age) = _per_sample(
            lengths, offsets, req, item, category, htime, recent, age)

        # labels from the evidence older than the recent window
        cos = np.einsum("nd,nd->n", self.latents[h_item], self.latents[t_item[s_seg]])
        match = (h_cat == t_cat[s_seg]) & ~h_recent
        contrib = np.where(match, (0.3 + 0.7 * np.maximum(cos, 0) ** 2) * _decay(h_age), 0)
        evidence = np.bincount(s_seg, weights=contrib, minlength=b)
        short_match = np.bincount(s_seg, weights=(h_recent & (h_cat == t_cat[s_seg])), minlength=b) > 0
        logit = 2.5 * np.log1p(evidence) + 1.0 * short_match - 3.0
        labels = (rng.random(b) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        relevant = match & (cos > 0.7)

        return _assemble(user[req], request_time[req], t_item, t_cat, s_lengths, h_item, h_cat,
                         h_time, labels, relevant), torch.from_numpy(logit.astype(np.float64))

    def _similarity_batch(self, rng: np.random.Generator, split: str, batch_size: int,
                          user: np.ndarray, request_time: np.ndarray, week: np.ndarray,
                          lengths: np.ndarray, offsets: np.ndarray, seg: np.ndarray,
                          recent: np.ndarray) -> Tuple[Batch, torch.Tensor]:
        """The similarity regime from the behaviors on (requests and lengths drawn as in the
        category regime): ``user``, ``request_time``, ``week``, ``lengths [R]``, ``offsets [R +
        1]``, ``seg`` and ``recent [N]`` of the requests' behaviors."""
        cfg = self.config
        r, n, g, b = len(lengths), int(lengths.sum()), cfg.candidates_per_request, batch_size
        nbr, m = self.neighbours, cfg.neighbours
        j_long = np.arange(cfg.long_term_interests)
        long_anchor = (_hash(cfg.seed, user[:, None], j_long, 21) % cfg.num_items).astype(np.int64)
        j_short = np.arange(cfg.short_term_interests)
        short_anchor = (_hash(cfg.seed, user[:, None], week[:, None], j_short, 23)
                        % cfg.num_items).astype(np.int64)

        # behaviors: near a long-term anchor (old), a short-term one (recent), or random
        u = rng.random(n)
        item = rng.integers(cfg.num_items, size=n)
        near = rng.integers(m, size=n)
        n_old = np.maximum(lengths - cfg.recent_window, 1)  # [R]
        is_long = ~recent & (u < np.minimum(1.0, cfg.interest_behaviors / n_old)[seg])
        item = np.where(is_long, nbr[long_anchor[seg, rng.integers(cfg.long_term_interests,
                                                                   size=n)], near], item)
        is_short = recent & (u < cfg.short_term_share)
        item = np.where(is_short, nbr[short_anchor[seg, rng.integers(cfg.short_term_interests,
                                                                     size=n)], near], item)
        category = item // cfg.items_per_category

        age, htime = _timestamps(rng, request_time, offsets, seg)

        # candidates: near a long-term anchor (50%) or random
        req = np.repeat(np.arange(r), g)
        kind = rng.random(b)
        t_item = rng.integers(cfg.num_items, size=b)
        t_near = rng.integers(m, size=b)
        t_item = np.where(kind < 0.5, nbr[long_anchor[req, rng.integers(
            cfg.long_term_interests, size=b)], t_near], t_item)
        t_cat = t_item // cfg.items_per_category

        s_lengths, s_seg, (h_item, h_cat, h_time, h_recent, h_age) = _per_sample(
            lengths, offsets, req, item, category, htime, recent, age)

        # labels from the similarity of the candidate to the behaviors older than the window
        cos = np.einsum("nd,nd->n", self.latents[h_item], self.latents[t_item[s_seg]])
        decay = np.where(~h_recent, _decay(h_age), 0)  # the old behaviors' weight by age
        evidence = np.bincount(s_seg, weights=similarity_weight(cos) * decay, minlength=b)
        # what a history of uniform items at the same ages would give this candidate: its prior
        expected = self.prior[t_item] * np.bincount(s_seg, weights=decay, minlength=b)
        logit = 4.0 * (np.log1p(evidence) - np.log1p(expected)) - SIM_BIAS
        labels = (rng.random(b) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        relevant = ~h_recent & (cos > SIM_RELEVANT)
        return _assemble(user[req], request_time[req], t_item, t_cat, s_lengths, h_item, h_cat,
                         h_time, labels, relevant), torch.from_numpy(logit.astype(np.float64))


def _timestamps(rng: np.random.Generator, request_time: np.ndarray, offsets: np.ndarray,
                seg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(age [N], time [N])`` of the behaviors of requests ``offsets [R + 1]`` (``seg [N]``
    their request): each history spans 0.5-3 years, strictly before its request time."""
    r, n = len(offsets) - 1, len(seg)
    span = rng.uniform(0.5, 3.0, size=r) * YEAR
    gaps = rng.exponential(1.0, size=n)
    total = np.bincount(seg, weights=gaps, minlength=r)
    gaps *= (span / np.where(total > 0, total, 1.0))[seg]  # sum to span exactly
    csum = np.concatenate([[0.0], np.cumsum(gaps)])  # csum[offsets[b + 1]]: end of sample b
    age = csum[offsets[1:]][seg] - csum[1:] + gaps  # time from behavior to request
    return age, request_time[seg] - np.maximum(np.ceil(age), 1).astype(np.int64)


def _per_sample(lengths: np.ndarray, offsets: np.ndarray, req: np.ndarray,
                *per_behavior: np.ndarray) -> Tuple[np.ndarray, np.ndarray, List[np.ndarray]]:
    """Each request's history replicated for its candidates: ``req [B]`` the request of each
    sample; returns ``(lengths [B], seg [M], [values[M] of every per_behavior [N] array])``."""
    s_lengths = lengths[req]
    s_offsets = np.concatenate([[0], np.cumsum(s_lengths)])
    s_seg = np.repeat(np.arange(len(req)), s_lengths)
    s_index = offsets[req][s_seg] + np.arange(s_offsets[-1]) - s_offsets[s_seg]
    return s_lengths, s_seg, [values[s_index] for values in per_behavior]


def _decay(age: np.ndarray) -> np.ndarray:
    """A behavior's weight in the label by its age in seconds: ``0.5 + 0.5 exp(-age / 180
    days)``."""
    return 0.5 + 0.5 * np.exp(-age / (180 * DAY))


def _assemble(users: np.ndarray, request_time: np.ndarray, t_item: np.ndarray,
              t_cat: np.ndarray, s_lengths: np.ndarray, h_item: np.ndarray, h_cat: np.ndarray,
              h_time: np.ndarray, labels: np.ndarray, relevant: np.ndarray) -> Batch:
    """The ``Batch`` of per-sample ``[B]`` arrays and per-behavior ``[N]`` arrays."""
    b = len(t_item)
    hour = (request_time // 3600) % 24
    ones = np.ones(b, dtype=np.int64)
    features = KeyedJaggedTensor(
        keys=FEATURE_KEYS,
        values=torch.from_numpy(np.concatenate(
            [users, hour, t_item, t_cat, h_item, h_cat]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(
            [ones, ones, ones, ones, s_lengths, s_lengths]).astype(np.int32)),
    )
    return Batch(
        features=features,
        history_time=torch.from_numpy(h_time),
        request_time=torch.from_numpy(request_time),
        labels=torch.from_numpy(labels),
        relevant=torch.from_numpy(relevant),
    )


class SyntheticLifelongSequences(IterableDataset):
    """A stream of ready-made batches (use ``DataLoader(dataset, batch_size=None)``).

    Rank ``rank`` of ``world_size`` takes the global batches ``i * world_size + rank`` for
    ``i = start, start + 1, ...``; DataLoader workers split those round-robin and the DataLoader
    returns them in order, so the stream is the same for any worker count. Memory is one batch per
    worker.

    Args:
        config (SyntheticConfig): the world.
        split (str): ``"train"``, ``"val"`` or ``"test"``.
        batch_size (int): samples per batch (per rank).
        num_batches (Optional[int]): batches per rank; ``None`` streams forever.
        rank (int), world_size (int), start (int): sharding of the stream and where to resume.

    Example::

        ds = SyntheticLifelongSequences(SyntheticConfig(max_seq_len=10_000), "train", 128)
        batch = next(iter(DataLoader(ds, batch_size=None, num_workers=1)))
    """

    def __init__(self, config: SyntheticConfig, split: str, batch_size: int,
                 num_batches: Optional[int] = None, rank: int = 0, world_size: int = 1,
                 start: int = 0) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.config, self.split, self.batch_size = config, split, batch_size
        self.num_batches, self.rank, self.world_size, self.start = num_batches, rank, world_size, start

    def __iter__(self) -> Iterator[Batch]:
        generator = SyntheticGenerator(self.config)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        i = self.start + worker
        while self.num_batches is None or i < self.start + self.num_batches:
            yield generator.batch(self.split, i * self.world_size + self.rank, self.batch_size)
            i += workers
