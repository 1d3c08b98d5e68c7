"""ef21 core: the EF21 method family over numpy.

This package is the math that the master and the workers share (objectives, data, compressors, methods,
stepsizes, the sparse codec) and a single-process simulator. It imports no gRPC and no protobuf, so everything in
it can be tested and simulated in one process.
"""

__version__ = "0.1.0"
