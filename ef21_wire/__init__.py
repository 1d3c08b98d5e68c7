"""The wire: generated protobuf code (``v1``, produced by scripts/gen_proto.sh) and the conversions to and from
the core's types (``serde``). Protobuf never reaches the algorithm code."""
