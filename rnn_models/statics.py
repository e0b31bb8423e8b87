"""Per-series attributes of a global model (a store's type, a meter's building class, a size) as
numeric columns: a categorical attribute one-hot, one column per category seen in training (the
first layer's weights on them are then that category's learnt embedding), a numeric one as it is
(the covariate scaler, fitted on the training rows, scales it). An attribute holds for every time
step, so a forecaster reads the encoded columns as covariates known ahead: beside the history and
for each horizon step.

A category the model never saw encodes as all zeros (no category) and is said, never refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class StaticEncoding:
    categories: dict[str, list[str]] = field(default_factory=dict)  # categorical column -> its categories
    numeric: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # the attributes as given

    @classmethod
    def fit(cls, attributes: pd.DataFrame) -> StaticEncoding:
        """From one row per series (one column per attribute): text columns categorical, numbers numeric."""
        enc = cls(order=list(attributes.columns))
        for col in attributes.columns:
            if pd.api.types.is_numeric_dtype(attributes[col]):
                enc.numeric.append(col)
            else:
                enc.categories[col] = sorted(attributes[col].astype(str).unique())
        return enc

    @property
    def columns(self) -> list[str]:
        """The encoded columns, in order: ``type=a``, ``type=b``, ..., ``size``."""
        return [f"{col}={c}" if col in self.categories else col
                for col in self.order for c in self.categories.get(col, [None])]

    def encode(self, attributes: pd.DataFrame) -> tuple[np.ndarray, dict[str, list[str]]]:
        """One row per series -> (S, K) encoded values, and {column: unseen categories} (each encoded as none)."""
        out, unseen = [], {}
        for col in self.order:
            if col in self.categories:
                values = attributes[col].astype(str).to_numpy()
                known = self.categories[col]
                out.append((values[:, None] == np.array(known)[None, :]).astype(np.float64))
                new = sorted(set(values) - set(known))
                if new:
                    unseen[col] = new
            else:
                out.append(pd.to_numeric(attributes[col], errors="raise").to_numpy(np.float64)[:, None])
        return (np.concatenate(out, axis=1) if out else np.zeros((len(attributes), 0))), unseen

    def to_dict(self) -> dict:
        return {"categories": self.categories, "numeric": self.numeric, "order": self.order}

    @classmethod
    def from_dict(cls, d: dict) -> StaticEncoding:
        return cls({k: list(v) for k, v in d["categories"].items()}, list(d["numeric"]), list(d["order"]))


def per_series(frame: pd.DataFrame, id_column: str, columns: list[str]) -> pd.DataFrame:
    """One row per series (in the order they first appear) of ``columns``, which must not vary within
    a series: ValueError naming the column, the series and two of its values otherwise."""
    for col in columns:
        if frame[col].isna().any():
            row = int(np.flatnonzero(frame[col].isna().to_numpy())[0])
            raise ValueError(f"static column {col!r} is empty for series {frame[id_column].iloc[row]!r} "
                             f"(row {row + 1})")
        counts = frame.groupby(id_column, sort=False)[col].nunique()
        if (counts > 1).any():
            sid = counts.index[int(np.flatnonzero(counts.to_numpy() > 1)[0])]
            two = frame.loc[frame[id_column] == sid, col].unique()[:2]
            raise ValueError(f"static column {col!r} varies within series {sid!r} ({two[0]!r} and {two[1]!r}); "
                             "an attribute holds one value per series")
    return frame.groupby(id_column, sort=False)[columns].first()
