"""How much exact work an approximate first pass would leave in the grouped forward
(DeepSeek-V3: E 256, k 8, 8 groups, 4 kept, group score = the sum of a group's top 2), if every
selection score z were known only to within +-d (z~ = z + err, |err| <= d; err drawn uniformly
here, the worst case being no worse for the counts' bounds). On the host, numpy only:

    python benchmarks/emulate_grouped_screen.py

It prints, for bias scales 0, 0.1 and 1 and d = 2^-9 .. 2^-7:
- the rows whose 4th and 5th approximate group scores are within 4 d (a score sums two values,
  each off by d; two scores compared: 4 d), i.e. the rows whose kept groups are not settled by
  the approximate scores alone;
- the experts of the approximately kept groups with z~ >= tau~ - 2 d (tau~ the k-th z~): the
  candidates whose exact z decide the selection (benchmarks/NOTES.md, "Not done" 1, for the
  2 d bound);
- for the unsettled rows, the groups within 4 d of either boundary score and the exact lookups
  their top-2 sums need (each such group's experts with z~ >= its 2nd z~ - 2 d).
"""

from __future__ import annotations

import numpy as np

T, E, G, GK, K = 65536, 256, 8, 4, 8


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, E)).astype(np.float32)
    for bias_scale in (0.0, 0.1, 1.0):
        b = (bias_scale * rng.standard_normal(E)).astype(np.float32)
        z = 1 / (1 + np.exp(-x)) + b
        for d in (2.0**-9, 2.0**-8, 2.0**-7):
            za = z + rng.uniform(-d, d, z.shape).astype(np.float32)
            g = za.reshape(T, G, E // G)
            s2 = np.sort(g, axis=2)
            top2 = s2[:, :, -2:].sum(axis=2)
            srt = np.sort(top2, axis=1)[:, ::-1]
            lo_b, hi_b = srt[:, GK], srt[:, GK - 1]
            unsettled = hi_b - lo_b <= 4 * d
            kept = np.argsort(-top2, axis=1)[:, :GK]
            mask = np.zeros((T, G), bool)
            np.put_along_axis(mask, kept, True, axis=1)
            zk = np.where(np.repeat(mask, E // G, axis=1), za, -np.inf)
            tau = -np.sort(-zk, axis=1)[:, K - 1]
            cand = (zk >= (tau - 2 * d)[:, None]).sum(axis=1)
            near = (np.abs(top2 - lo_b[:, None]) <= 4 * d) | (np.abs(top2 - hi_b[:, None]) <= 4 * d)
            fix = near & unsettled[:, None]
            per = (g >= (s2[:, :, -2] - 2 * d)[:, :, None]).sum(axis=2)
            lookups = np.where(fix, per, 0).sum(axis=1)
            print(f"bias {bias_scale:3} d 2^{int(np.log2(d))}: unsettled rows {unsettled.mean() * 100:5.1f}%, "
                  f"groups to fix {fix.sum(axis=1).mean():.2f} a row, their exact lookups "
                  f"{lookups.mean():.2f} (p99 {np.percentile(lookups, 99):.0f}); candidates "
                  f"{cand.mean():.2f} (p99 {np.percentile(cand, 99):.0f}, max {cand.max()})")


if __name__ == "__main__":
    main()
