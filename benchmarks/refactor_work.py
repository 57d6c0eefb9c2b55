"""A fixed amount of int8, topk and comm work, for instruction counts before/after."""

import sys

import torch

import pykernels as pk
from pykernels import comm

torch.manual_seed(0)
torch.set_num_threads(1)
pk.set_num_threads(1)
fam = sys.argv[1]
x = torch.randn(16, 1024)
lin = pk.nn.Int8Linear.from_linear(torch.nn.Linear(1024, 1024))
g = torch.randn(1 << 20)
small = torch.randn(4, 64)
lin_small = pk.nn.Int8Linear.from_linear(torch.nn.Linear(64, 64))
codec_t, codec_q = comm.TopK(ratio=0.01), comm.Quantize(bits=8)
with torch.no_grad():
    for _ in range(3):  # warm-up: imports, first-call checks
        lin(x)
        lin_small(small)
        pk.ops.topk_sparsify(g, ratio=0.01)
        codec_t.decode(codec_t.encode(g, key="a"))
        codec_q.decode(codec_q.encode(g, key="b"))
    import ctypes

    def measured():
        for _ in range(reps):
            body()

    def body():
        if fam == "int8":
            lin(x)
            for _ in range(50):
                lin_small(small)  # dispatch overhead dominates a tiny layer
        elif fam == "topk":
            pk.ops.topk_sparsify(g, ratio=0.01)
        elif fam == "comm":
            codec_t.decode(codec_t.encode(g, key="a"))
            codec_q.decode(codec_q.encode(g, key="b"))

    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    # Run inside qsort's comparator, so `valgrind --toggle-collect=qsort` counts
    # this work and nothing of the imports and warm-up.
    CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    calls = []

    def cmp(a, b):
        if not calls:
            calls.append(1)
            measured()
        return 0

    arr = (ctypes.c_int * 2)(1, 2)
    ctypes.CDLL(None).qsort(arr, 2, ctypes.sizeof(ctypes.c_int), CMP(cmp))
