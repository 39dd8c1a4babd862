"""Timing of the exact analysis (issue targets: TabularPolicy V=2, T=16 under 0.5 s; MarkovPolicy V=4, T=512
under 1 s, one configuration each).

    python benchmarks/bench_exact.py [--repeats 5] [--out runs/benchmarks/exact.json]

Reports the median and minimum wall time over repeats, after one warm-up call (which also fills the
sequence cache), for the expected gradient of several configurations and for the variance.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from kl_lib import KLConfig, exact
from kl_lib.files import environment_info, write_json
from kl_lib.toy import MarkovPolicy, TabularPolicy

CASES = [
    ("tabular V=2 T=16", TabularPolicy, 2, 16, "expected_kl_grad", KLConfig("k1", "reward")),
    ("tabular V=2 T=16", TabularPolicy, 2, 16, "expected_kl_grad", KLConfig("k3", "loss")),
    ("tabular V=2 T=16", TabularPolicy, 2, 16, "expected_kl_grad", KLConfig("analytic", "both")),
    ("tabular V=2 T=16", TabularPolicy, 2, 16, "kl_grad_variance", KLConfig("k1", "reward")),
    ("markov V=4 T=512", MarkovPolicy, 4, 512, "expected_kl_grad", KLConfig("k1", "reward")),
    ("markov V=4 T=512", MarkovPolicy, 4, 512, "expected_kl_grad", KLConfig("k3", "both")),
    ("markov V=4 T=512", MarkovPolicy, 4, 512, "expected_kl_grad", KLConfig("k3", "loss", importance_weighting="token")),
    ("markov V=4 T=512", MarkovPolicy, 4, 512, "kl_grad_variance", KLConfig("k3", "reward")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/benchmarks/exact.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for name, cls, V, T, fn_name, cfg in CASES:
        g = torch.Generator().manual_seed(0)
        policy, ref = cls.random(V, T, generator=g), cls.random(V, T, generator=g)
        fn = getattr(exact, fn_name)
        fn(policy, ref, cfg)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn(policy, ref, cfg)
            times.append(time.perf_counter() - start)
        rows.append({"case": name, "function": fn_name, "config": cfg.name, "median_s": statistics.median(times),
                     "min_s": min(times)})
        print(f"{name:18s} {fn_name:17s} {cfg.name:16s} median {rows[-1]['median_s']:.3f} s  min {min(times):.3f} s")
    write_json(args.out, {"machine": {"cpus": os.cpu_count(), "processor": platform.processor()},
                          "environment": environment_info(), "results": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
