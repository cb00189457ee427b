"""The reference's two mixed-batch paths agree, and the gathered one is taken only when it pays."""

import torch

from lora_kernels.ops import reference
from lora_kernels.ops.routing import Routing


def test_gathered_equals_segmented_with_untasked_rows_untouched():
    torch.manual_seed(0)
    t, r, k, n = 5, 3, 11, 7
    a, b, scales = torch.randn(t, r, k, dtype=torch.float64), torch.randn(t, n, r, dtype=torch.float64), torch.randn(t, dtype=torch.float64)
    for shape in [(9, k), (9, 4, k)]:
        x = torch.randn(*shape, dtype=torch.float64)
        routing = Routing(torch.tensor([4, -1, 0, 2, 4, -1, 1, 3, 0]), t)
        y0 = torch.randn(*shape[:-1], n, dtype=torch.float64)
        seg = reference.segmented_delta(y0.clone(), x, routing, lambda i, xs: reference.low_rank(xs, a[i], b[i], float(scales[i])))
        gat = reference.gathered_delta(y0.clone(), x, routing, a, b, scales)
        torch.testing.assert_close(gat, seg)
        assert torch.equal(gat[1], y0[1]) and torch.equal(gat[5], y0[5])


def test_gather_pays_only_for_many_tasks_and_small_copies():
    few = Routing(torch.tensor([0, 1, 0, 1]), 2)
    many = Routing(torch.tensor([0, 1, 2, 3]), 4)
    x = torch.zeros(4, 64)
    assert not reference.gather_pays(few, x, rank=8, n_out=64)
    assert reference.gather_pays(many, x, rank=8, n_out=64)
    big = Routing(torch.arange(8192) % 64, 64)  # 8k rows of rank 64 at 4096x4096 would gather 4 G elements
    assert not reference.gather_pays(big, torch.zeros(8192, 4096, device="meta"), rank=64, n_out=4096)
