"""Master cost per round for EF21: O(n·k + d), never O(n·d); aggregation against one vectorised scatter-add.

The master's work on a round is ``MasterNode.aggregate`` (fold n sparse messages into the sum, update the
per-worker copies of g_i, apply to x and g) plus decoding. This script times it directly, without the network,
for growing d and n at fixed k, and compares the folding of n messages with one ``np.add.at`` of all their
entries. It also reports the memory the master holds against (n + 3)·8·d bytes.

    python benchmarks/master_cost.py [--smoke] [--json out.json]
"""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, best_time, print_table, write_json  # noqa: E402

from ef21.compressors import TopK  # noqa: E402
from ef21.engine import MasterNode  # noqa: E402
from ef21.methods import EF21, Message  # noqa: E402
from ef21.sparse import sparse_sum  # noqa: E402


def main() -> None:
    args = base_parser(__doc__).parse_args()
    rng = np.random.default_rng(0)
    grid = ([(10_000, 4, 100)] if args.smoke else
            [(d, n, k) for d in (10_000, 100_000, 1_000_000, 10_000_000) for n in (4, 16, 64)
             for k in (100, 10_000) if d * n <= 2 * 10**8 and k * 10 <= d])
    rows, results = [], []
    for d, n, k in grid:
        msgs = [Message(TopK(k)(rng.standard_normal(d))) for _ in range(n)]
        tracemalloc.start()
        master = MasterNode(EF21(), n, np.zeros(d), gamma=0.1)
        master.aggregate(msgs)  # warm-up; also the first allocation of everything it holds
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        number = 5 if d >= 1_000_000 else 50
        t_round = best_time(lambda: master.aggregate(msgs), number, repeat=3)
        t_fold = best_time(lambda: sparse_sum([m.vector for m in msgs], d), number, repeat=3)
        all_idx = np.concatenate([m.vector.indices for m in msgs]).astype(np.intp)
        all_val = np.concatenate([m.vector.values for m in msgs])
        acc = np.zeros(d)

        def scatter() -> None:
            np.add.at(acc, all_idx, all_val)

        t_scatter = best_time(scatter, number, repeat=3)
        target = (n + 3) * 8 * d
        rows.append([d, n, k, t_round * 1e3, t_fold * 1e3, t_scatter * 1e3, t_fold / t_scatter, held / target])
        results.append({"d": d, "n": n, "k": k, "round_ms": t_round * 1e3, "fold_ms": t_fold * 1e3,
                        "scatter_add_ms": t_scatter * 1e3, "held_bytes": held, "target_bytes": target})
    print("EF21 master, Top-k messages: time per round and memory held")
    print_table(["d", "n", "k", "round ms", "fold ms", "scatter-add ms", "fold/scatter", "mem/(n+3)8d"], rows)
    write_json(args.json, "master_cost", results)


if __name__ == "__main__":
    main()
