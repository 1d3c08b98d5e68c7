"""Wire efficiency: bytes per message against the payload, and codec speed against a plain numpy copy.

Uplink: the serialized WorkerMessage(Update) of a Top-k message plus gRPC's 5-byte frame prefix, against the
payload 12·k bytes (uint32 index + float64 value), in the plain and the compact encoding (float32 values,
Elias–Fano indices). Downlink: the RoundResult of n workers' messages against the number of distinct indices in
the round, at two dimensions, to show that it does not grow with d. Speed: encode (SparseVector → the bytes
gRPC sends) and decode (received bytes → validated SparseVector) against copying the same bytes with numpy.

    python benchmarks/wire.py [--smoke] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, best_time, print_table, write_json  # noqa: E402

from ef21.compression.codec import decode, encode  # noqa: E402
from ef21.compression.compressors import Float32Values, TopK  # noqa: E402
from ef21.engine.nodes import WorkerReport  # noqa: E402
from ef21.methods import EF21, Message  # noqa: E402
from ef21_wire.protocol import GRPC_FRAME_BYTES  # noqa: E402
from ef21_wire.serde import read_update_fast, round_result_to_bytes, update_from_proto  # noqa: E402
from ef21_wire.v1 import ef21_pb2 as pb  # noqa: E402
from ef21_worker.client import update_message  # noqa: E402


def update_raw(vec, compact: bool = False, round_: int = 12345) -> bytes:
    """Exactly what a worker sends: ``worker.client.update_message`` of a report with this vector."""
    report = WorkerReport(round_, Message(vec), 0.693147, np.zeros(0), 1.5e-3)
    return update_message(report, compact=compact)


def decode_update(raw: bytes, d: int):  # type: ignore[no-untyped-def]
    """What the master does with it: read the message, decode and validate the vector."""
    u = read_update_fast(raw) or update_from_proto(pb.WorkerMessage.FromString(raw).update)
    return decode(u.vector, expected_dim=d)


def main() -> None:
    args = base_parser(__doc__).parse_args()
    rng = np.random.default_rng(0)
    d = 100_000 if args.smoke else 1_000_000
    ks = [1, 100] if args.smoke else [1, 10, 100, 1000, 10_000, 100_000]

    up_rows, speed_rows, results = [], [], []
    for k in ks:
        vec = TopK(k)(rng.standard_normal(d))
        vec32 = Float32Values(TopK(k))(rng.standard_normal(d))
        raw, raw32 = update_raw(vec), update_raw(vec32, compact=True)
        wire, wire32 = len(raw) + GRPC_FRAME_BYTES, len(raw32) + GRPC_FRAME_BYTES
        payload = 12 * k
        up_rows.append([k, payload, wire, wire / payload, wire / k, wire32, wire32 / k])
        # Speed: encode and decode against copying the same index and value bytes with numpy.
        idx, val = vec.indices, vec.values
        n_iter = 20 if args.smoke else max(20, 200_000 // k)  # smoke: that it runs, not how fast
        t_copy = best_time(lambda: (idx.copy(), val.copy()), n_iter)
        t_enc = best_time(lambda: update_raw(vec), n_iter)
        t_dec = best_time(lambda: decode_update(raw, d), n_iter)
        t_enc32 = best_time(lambda: update_raw(vec32, compact=True), n_iter)
        t_dec32 = best_time(lambda: decode_update(raw32, d), n_iter)
        speed_rows.append([k, t_copy * 1e6, t_enc * 1e6, t_dec * 1e6, t_copy / t_enc, t_copy / t_dec,
                           t_enc32 * 1e6, t_dec32 * 1e6])
        results.append({"k": k, "d": d, "payload": payload, "uplink_wire_bytes": wire, "ratio": wire / payload,
                        "compact_wire_bytes": wire32, "compact_bytes_per_entry": wire32 / k,
                        "copy_us": t_copy * 1e6, "encode_us": t_enc * 1e6, "decode_us": t_dec * 1e6,
                        "compact_encode_us": t_enc32 * 1e6, "compact_decode_us": t_dec32 * 1e6})

    print(f"Uplink Update message, Top-k of d = {d}: plain (float64 values, uint32 indices) and compact")
    print_table(["k", "payload B", "wire B", "wire/payload", "B/entry", "compact B", "compact B/entry"], up_rows)
    print("\nCodec speed (best of 5; microseconds per message) against a numpy copy of the same arrays")
    print_table(["k", "copy us", "encode us", "decode us", "copy/encode", "copy/decode", "compact enc us",
                 "compact dec us"], speed_rows)

    # Downlink: n workers' EF21 messages aggregated; bytes follow the distinct indices, not d.
    n, k = 8, 100 if args.smoke else 1000
    down_rows = []
    for dim in (d // 10, d):
        grads = [rng.standard_normal(dim) for _ in range(n)]
        msgs = [Message(TopK(k)(g)) for g in grads]
        down = EF21().master_aggregate(np.zeros((n, dim)), msgs, dim)
        raw = round_result_to_bytes(1, encode(down.vector), False, 1 / n, b"", [])
        distinct = down.vector.nnz
        down_rows.append([dim, n, k, distinct, len(raw) + GRPC_FRAME_BYTES, (len(raw) + GRPC_FRAME_BYTES) / distinct])
        results.append({"downlink_d": dim, "n": n, "k": k, "distinct": distinct,
                        "downlink_wire_bytes": len(raw) + GRPC_FRAME_BYTES})
    print(f"\nDownlink RoundResult, {n} workers' Top-{k} messages")
    print_table(["d", "n", "k", "distinct idx", "wire B", "B/idx"], down_rows)
    write_json(args.json, "wire", results)


if __name__ == "__main__":
    main()
