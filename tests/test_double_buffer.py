"""Global rows in two copies (steer_actors.double_buffer) on real layer modules and the real op (CPU
path): a change written while a forward runs waits for nothing, that forward reads one version on every
layer, and the next forward reads the change."""

from __future__ import annotations

import threading

import torch

from steer_actors.double_buffer import SELECTOR
from steer_actors.ops import Op, ops_to_flat
from steer_actors.patch import LayerSteerer, load_packed, pack_rows

H, L = 16, 3


def make_layers():
    return [LayerSteerer(i, H, 2, max_tokens=8, num_layers=L) for i in range(L)]


def commit(layers, v):
    rows = ops_to_flat([Op("add", v, scale=1.0)], 2, H)
    SELECTOR.write(lambda copy: load_packed(pack_rows([(layer, rows, True) for layer in layers], ("global", copy))))


def forward(layers, x, after_first_layer=None):
    SELECTOR.at_forward_start()  # what the runner hook does before it enqueues a forward
    for i, layer in enumerate(layers):
        d = torch.zeros_like(x)
        layer(d, x)
        x = d + x
        if i == 0 and after_first_layer is not None:
            after_first_layer()
    return x


def test_a_change_during_a_forward_lands_whole_at_the_next_one():
    layers = make_layers()
    g = torch.Generator().manual_seed(0)
    v1, v2, v3 = (torch.randn(H, generator=g) for _ in range(3))
    x = torch.randn(2, H, generator=g)
    commit(layers, v1)
    torch.testing.assert_close(forward(layers, x), x + L * v1)
    # written while layer 0 of this forward has run and layers 1-2 have not: they still read v1
    out = forward(layers, x, after_first_layer=lambda: commit(layers, v2))
    torch.testing.assert_close(out, x + L * v1)
    torch.testing.assert_close(forward(layers, x), x + L * v2)
    # two changes between forwards: the later wins, whole
    commit(layers, v3)
    commit(layers, v1)
    torch.testing.assert_close(forward(layers, x), x + L * v1)
    # an empty change turns every layer off in the copy it writes
    SELECTOR.write(lambda copy: load_packed(pack_rows([(layer, ops_to_flat([], 2, H), False) for layer in layers],
                                                      ("global", copy))))
    torch.testing.assert_close(forward(layers, x), x)


def test_a_writer_never_waits_for_a_forward_being_enqueued():
    """The runner holds its forward lock while it enqueues; a change does not need that lock."""
    from steer_actors.channel import LOCK

    layers = make_layers()
    v = torch.randn(H, generator=torch.Generator().manual_seed(1))
    done = threading.Event()
    with LOCK:  # a forward being enqueued, for as long as it takes
        th = threading.Thread(target=lambda: (commit(layers, v), done.set()), daemon=True)
        th.start()
        assert done.wait(5), "the change waited for the forward lock"
    x = torch.zeros(1, H)
    torch.testing.assert_close(forward(layers, x), x + L * v)
