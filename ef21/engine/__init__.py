"""The engine: rounds, independent of any transport.

- ``config``: ``RunConfig``, everything that determines a run's iterates.
- ``plan``: a configuration and the problem's facts resolved into what both sides agree on (method, compressors,
  stepsize, estimator, step rule, weights).
- ``nodes``: ``WorkerNode`` and ``MasterNode``, the two roles of a round with their state: what the simulator
  drives in one process and what the gRPC worker and master drive over the network.
- ``accounting``: the bits a round's messages cost (the paper's count and an honest one).
- ``records``: a round's log line, and when a run stops.
- ``simulate``: the single-process simulator, the reference the service must reproduce bit for bit.

May import: ``ef21.methods``, ``ef21.problems``, ``ef21.compression``, ``ef21.errors``. It knows no method by
name (methods are looked up in their registry) and no transport.
"""
