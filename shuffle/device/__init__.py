"""Device (CUDA) memory: the only folder that imports CuPy, RMM or cuDF, lazily.

``_options`` (device settings), ``_cuda`` (memory hooks, registries, GPU probing),
``_allocator`` (receive allocators), ``_arrays`` (CuPy arrays of array pieces, host
copies), ``_cudf`` (cuDF frames as shuffle pieces: split, codec, concat). Importing
any of them imports no GPU library.
"""
