"""Flower records <-> the plain message contents of :mod:`peel_fed.messages`.

The one conversion between the wire format's plain dicts and Flower's ``RecordDict``, used by
both adapters: the ClientApp (``clients``) and the ServerApp (``strategies``). Kept free of
torch, since the device imports it for every message.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from peel_fed.messages import Arrays, Content


def to_array_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(rec: ArrayRecord) -> Arrays:
    return {k: v.numpy() for k, v in rec.items()}


def to_record_dict(content: Content) -> RecordDict:
    """One ArrayRecord, ConfigRecord or MetricRecord per named part of ``content``."""
    records: dict = {name: to_array_record(a) for name, a in content.arrays.items()}
    records.update({name: ConfigRecord(dict(c)) for name, c in content.configs.items()})
    records.update({name: MetricRecord(dict(m)) for name, m in content.metrics.items()})
    return RecordDict(records)


def from_record_dict(records: RecordDict, with_arrays: bool = True) -> Content:
    """The plain contents of ``records``; ``with_arrays=False`` leaves the arrays packed (for a
    look at the metrics of a large upload)."""
    arrays = records.array_records.items() if with_arrays else ()
    return Content(
        arrays={name: from_array_record(r) for name, r in arrays},
        configs={name: dict(r) for name, r in records.config_records.items()},
        metrics={name: dict(r) for name, r in records.metric_records.items()},
    )
