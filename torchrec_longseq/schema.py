"""Sequence schemas: which of the user's features make up one behavior sequence.

A module never names a feature key or a table: it is given a ``SequenceSchema``, as a TorchRec
table is given ``EmbeddingConfig.feature_names``. One schema describes one behavior sequence::

    attribute   history key      candidate key   table
    item        clk_seq_item     cand_item       item       <- the first attribute is the item
    category    clk_seq_cate     cand_cate       category   <- hard search matches on it
    shop        clk_seq_shop     cand_shop       shop
    behavior    clk_seq_type     (none)          btype      <- no candidate counterpart

    history timestamps: the KJT key ``clk_seq_ts`` (or the model's dense ``history_time``)

* A behavior's embedding is the concatenation of its attributes' embeddings, in schema order
  (width ``sum(D_a)``). The candidate's embedding has the same layout, with zeros in the blocks
  of attributes that have no candidate key (a behavior type, a dwell bucket), so queries and keys
  have one width and DIN's ``q - k`` / ``q * k`` stay defined; searches that compare candidate
  and behavior (hard search, ETA, SDIM, SIM soft) use only the attributes with a candidate key.
* Every history key of one schema holds one id per behavior: equal lengths per sample, values
  aligned (the same behavior at the same position), oldest first.
* A candidate key holds one id per sample. Candidate and history keys of an attribute are looked
  up in the same table (the table's ``EmbeddingConfig.feature_names`` lists both).
* Timestamps: ``time_key`` names a KJT key with one int64 timestamp per behavior (aligned with
  the history keys); ``time_key=None`` reads the model's dense ``history_time`` argument instead,
  which a model can give to one sequence only. The request time is the model's dense
  ``request_time [B]``, one per sample, shared by all its sequences.

Several sequences (clicks, purchases) are several schemas, one module each; they may share
tables (and then share one lookup per step, see ``modules.sequence.SequenceArch``).

Example::

    clicks = SequenceSchema(
        attributes=[
            Attribute("clk_seq_item", "item", candidate_key="cand_item"),
            Attribute("clk_seq_cate", "category", candidate_key="cand_cate"),
            Attribute("clk_seq_shop", "shop", candidate_key="cand_shop"),
        ],
        time_key="clk_seq_ts",
        hard_search_key="clk_seq_cate",
    )
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple


@dataclass(frozen=True)
class Attribute:
    """One id attribute of a behavior.

    Args:
        history_key (str): KJT key holding this attribute's id for every behavior.
        table (str): name of the EmbeddingCollection table both keys are looked up in.
        candidate_key (Optional[str]): KJT key holding the candidate's id (one per sample);
            ``None`` for an attribute only behaviors have (e.g. behavior type).
    """

    history_key: str
    table: str
    candidate_key: Optional[str] = None


@dataclass(frozen=True)
class SequenceSchema:
    """The keys, tables and timestamps of one behavior sequence (see the module docstring).

    Args:
        attributes (Sequence[Attribute]): at least one; the first is the item (the identity of a
            behavior) and must have a candidate key.
        time_key (Optional[str]): KJT key of the behaviors' timestamps, or ``None`` for the
            model's dense ``history_time``.
        hard_search_key (Optional[str]): history key of the attribute hard search matches
            (default: the second attribute, the category, or the item if there is only one);
            it must have a candidate key.
    """

    attributes: Tuple[Attribute, ...]
    time_key: Optional[str] = None
    hard_search_key: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        if not self.attributes:
            raise ValueError("a SequenceSchema needs at least one attribute")
        if self.attributes[0].candidate_key is None:
            raise ValueError(f"the first attribute ({self.attributes[0].history_key!r}) is the "
                             f"item and needs a candidate key")
        keys = [a.history_key for a in self.attributes] + [
            a.candidate_key for a in self.attributes if a.candidate_key is not None]
        if self.time_key is not None:
            keys.append(self.time_key)
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"a key may appear once in a schema, repeated: {repeated}")
        if self.hard_search_key is None:
            default = self.attributes[1] if len(self.attributes) > 1 else self.attributes[0]
            if default.candidate_key is None:
                default = self.attributes[0]
            object.__setattr__(self, "hard_search_key", default.history_key)
        match = [a for a in self.attributes if a.history_key == self.hard_search_key]
        if not match:
            raise ValueError(f"hard_search_key {self.hard_search_key!r} is not a history key of "
                             f"this schema: {self.history_keys}")
        if match[0].candidate_key is None:
            raise ValueError(f"hard search matches the candidate on {self.hard_search_key!r}, "
                             f"which has no candidate key")

    @property
    def item(self) -> Attribute:
        return self.attributes[0]

    @property
    def history_keys(self) -> List[str]:
        return [a.history_key for a in self.attributes]

    @property
    def candidate_keys(self) -> List[str]:
        """The candidate keys of the attributes that have one, in schema order."""
        return [a.candidate_key for a in self.attributes if a.candidate_key is not None]

    @property
    def matched(self) -> List[Attribute]:
        """The attributes with a candidate key: what a search compares."""
        return [a for a in self.attributes if a.candidate_key is not None]

    @property
    def hard_search(self) -> Attribute:
        """The attribute hard search matches on."""
        return next(a for a in self.attributes if a.history_key == self.hard_search_key)

    @property
    def tables(self) -> List[str]:
        """Distinct tables in schema order."""
        return list(dict.fromkeys(a.table for a in self.attributes))

    def keys(self) -> List[str]:
        """Every KJT key the schema reads (history, candidate, timestamps)."""
        keys = self.history_keys + self.candidate_keys
        return keys + ([self.time_key] if self.time_key is not None else [])


def default_schema() -> SequenceSchema:
    """The layout of the synthetic data (``data.batch``): item and category, both with a candidate
    key, timestamps in the dense ``history_time``, hard search on the category."""
    return SequenceSchema(
        attributes=(Attribute("hist_item", "item", candidate_key="target_item"),
                    Attribute("hist_category", "category", candidate_key="target_category")),
        time_key=None,
        hard_search_key="hist_category",
    )
