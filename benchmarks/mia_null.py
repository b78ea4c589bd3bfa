"""The population MIA's AUC when forget and test losses share one distribution (no membership signal).

Out-of-fold AUCs of cross-validated classifiers are biased below 0.5 on small samples (a fold's training
part and its held-out part are anti-correlated: together they are the whole sample). This script measures
that bias for ``population_mia``'s ``auc`` and ``threshold_auc`` (no fitting) at several set sizes:

    python benchmarks/mia_null.py                 # 200 repeats per size, about 30 s
    python benchmarks/mia_null.py --repeats 50 --sizes 5,20
"""

from __future__ import annotations

import argparse

import numpy as np

from overunlearn.metrics.mia import population_mia


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--sizes", default="5,10,20,50,100,500", help="examples per set, comma-separated")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'n per set':>9}  {'auc mean':>8}  {'± se':>6}  {'threshold_auc mean':>18}  {'± se':>6}")
    for n in (int(s) for s in args.sizes.split(",")):
        auc, thr = [], []
        for r in range(args.repeats):
            res = population_mia(rng.normal(size=n), rng.normal(size=n), seed=r)
            auc.append(res.auc)
            thr.append(res.threshold_auc)
        se = lambda v: np.std(v, ddof=1) / np.sqrt(len(v))  # noqa: E731
        print(f"{n:>9}  {np.mean(auc):>8.3f}  {se(auc):>6.3f}  {np.mean(thr):>18.3f}  {se(thr):>6.3f}")


if __name__ == "__main__":
    main()
