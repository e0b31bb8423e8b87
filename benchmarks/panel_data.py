"""A generated panel of store sales whose movements come from inputs known in advance: the
benchmark of issue #29 (``bench_panel_covariates.py``) and ``data/stores.csv`` (README's example).

    .venv/bin/python benchmarks/panel_data.py --stores 6 --days 400 --out data/stores.csv

Each store sells ``size`` x its weekday pattern x 1.6 on a promotion day x 0.5 on a US public
holiday, with 5 % noise. Its weekday pattern depends on its ``store_type`` (a: flat weekdays and a
weekend peak, b: a Friday peak, c: a Monday-to-Friday rhythm with a closed-ish Sunday), its level on
its ``size``. Promotions come in runs of 3-5 days at random (about one day in six), independently
per store, and cut the ``price``: nothing in a store's past says when the next one comes, only the
promotion calendar (known in advance, as a retailer's is) does.

Columns: ``store, date, sales, promo, price, store_type, size``.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

WEEKDAY = {"a": [0.9, 0.9, 0.9, 0.95, 1.05, 1.3, 1.2],  # Monday first
           "b": [0.85, 0.9, 0.95, 1.0, 1.4, 1.0, 0.9],
           "c": [1.2, 1.15, 1.1, 1.1, 1.05, 0.8, 0.6]}
PROMO_UPLIFT, HOLIDAY_FACTOR, NOISE = 1.6, 0.5, 0.05


def promotions(days: int, rng: np.random.Generator) -> np.ndarray:
    """0/1 per day: runs of 3-5 promotion days, starting on about one day in twenty-five."""
    promo = np.zeros(days)
    for start in np.flatnonzero(rng.random(days) < 0.04):
        promo[start : start + rng.integers(3, 6)] = 1.0
    return promo


def stores(n: int = 40, days: int = 730, seed: int = 0, start: str = "2023-01-02", mean: bool = False) -> pd.DataFrame:
    """The long table of ``n`` stores over ``days`` days (see the module docstring); with ``mean``, a column
    ``mean`` of each day's sales before the noise: the forecast no model can beat on average."""
    import holidays

    rng = np.random.default_rng(seed)
    dates = pd.date_range(start, periods=days, freq="D")
    off = np.isin(dates.date, list(holidays.country_holidays("US", years=range(dates.year[0], dates.year[-1] + 1))))
    frames = []
    for i in range(n):
        kind, size = "abc"[i % 3], float(round(rng.uniform(50, 400)))
        promo = promotions(days, rng)
        pattern = np.array(WEEKDAY[kind])[dates.day_of_week]
        expected = size * pattern * np.where(promo > 0, PROMO_UPLIFT, 1.0) * np.where(off, HOLIDAY_FACTOR, 1.0)
        sales = expected * np.exp(rng.normal(0, NOISE, days))
        price = np.round(9.9 * np.where(promo > 0, 0.75, 1.0) + rng.normal(0, 0.1, days), 2)
        frames.append(pd.DataFrame({"store": f"store{i:02d}", "date": dates.strftime("%Y-%m-%d"),
                                    "sales": sales.round(1), "promo": promo.astype(int), "price": price,
                                    "store_type": kind, "size": size, **({"mean": expected} if mean else {})}))
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stores", type=int, default=40)
    p.add_argument("--days", type=int, default=730)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="CSV file to write")
    args = p.parse_args()
    stores(args.stores, args.days, args.seed).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
