"""Problems: the f_i a worker evaluates, and the data they are made of.

- ``objectives``: the built-in losses (logistic regression with the paper's regularizer, least squares, the
  separable quadratic) with their smoothness and curvature.
- ``data``: datasets (the shipped mushrooms, LIBSVM and .npz files, synthetic sets), sharding, fingerprints.
- ``plugins``: a user's objective (``--objective FILE.py:FUNC``), loaded and checked.
- ``problem``: from a problem specification to the n objectives, L and L̃.
- ``layout``: a model's tensors (names, shapes, dtypes), as workers report them and checkpoints keep them.
- ``torch``: a PyTorch model and loss as an objective (needs the ``torch`` extra).

May import: numpy, scipy, ``ef21.errors``. Problems sit beside the methods: neither imports the other, and the
engine joins them.
"""
